"""Many adapters over one frozen base: N adapters stacked on a leading adapter axis, each
with its own rank, alpha and targets, applied row by row (``jlora.core.matmul``).

A stack is the adapters of N specs resolved against one model (``stack``). Every kernel
any of them targets gets factors with an adapter axis ``N`` placed after the kernel's
leading stacked (``b``, scanned-layer) axes, so a layer scan slices them like the kernel:
``A [*b, N, *e, *i, r_max]``, ``B [*b, N, *e, r_max, *o]``, where ``r_max`` is the largest
rank among the adapters targeting that kernel. Adapter ``i``'s slice holds its solo
adapter (``lora.init_adapters`` with its own spec and key, bit for bit), zero-padded past
its rank; a kernel it does not target holds zeros. Zeros stay zeros through training,
exactly: with A's columns past r_i zero, B's rows past r_i get no gradient (their input
``x A`` is zero there) and vice versa, and the same holds for a whole untargeted slice;
Adam and decoupled weight decay leave a zero parameter with zero gradient at zero. Their
cost is compute: the padded and untargeted slices are multiplied like the rest.

Scales (alpha / r_i, or alpha / sqrt(r_i) with rsLoRA) differ per adapter and are folded
into B's slices by ``with_adapters``, as for one adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jlora.core import lora
from jlora.core.spec import LORA_A, LORA_B, LoraSpec, Plan, Target, plan
from jlora.core.tree import flatten, unflatten

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Stack:
  """N adapters' plans over one model, and the union of their targets.

  Attributes:
    plans: one ``Plan`` per adapter, in adapter order.
    targets: {kernel path: Target} over the union; ``rank`` is ``r_max`` there.
    ranks: {kernel path: each adapter's rank there (0: not targeted)}.
    scales: {kernel path: each adapter's scale there (0.0: not targeted)}.
  """
  plans: tuple[Plan, ...]
  targets: Mapping[str, Target]
  ranks: Mapping[str, tuple[int, ...]]
  scales: Mapping[str, tuple[float, ...]]

  @property
  def n(self) -> int:
    return len(self.plans)


def stack(params: PyTree, specs: Sequence[LoraSpec | Plan]) -> Stack:
  """The stack of ``specs`` (one per adapter) resolved against ``params`` (arrays or
  ``jax.ShapeDtypeStruct`` leaves). Specs may differ in rank, alpha, rsLoRA and targets;
  they must agree on the factors' dtype and train no parameter in full."""
  if not specs:
    raise ValueError("a stack needs at least one adapter spec")
  plans = tuple(plan(params, s) for s in specs)
  dtypes = {p.spec.dtype for p in plans}
  if len(dtypes) > 1:
    raise ValueError(f"stacked adapters need one factor dtype, got {sorted(map(str, dtypes))}")
  for i, p in enumerate(plans):
    if p.spec.full:
      raise ValueError(f"adapter {i}: parameters trained in full ({', '.join(p.spec.full)}) "
                       "cannot be stacked: each adapter would need its own copy")
  paths = sorted({path for p in plans for path in p.targets})
  targets, ranks, scales = {}, {}, {}
  for path in paths:
    own = [p.targets.get(path) for p in plans]
    first = next(t for t in own if t is not None)
    r_max = max(t.rank for t in own if t is not None)
    targets[path] = dataclasses.replace(first, rank=r_max, alpha=0.0, scale=0.0)
    ranks[path] = tuple(0 if t is None else t.rank for t in own)
    scales[path] = tuple(0.0 if t is None else t.scale for t in own)
  return Stack(plans, targets, ranks, scales)


def adapter_axis(target: Target) -> int:
  """Where the adapter axis sits in a stacked factor: after the leading ``b`` axes."""
  roles = [c for c in target.layout if c in "bei"]
  n = 0
  while n < len(roles) and roles[n] == "b":
    n += 1
  return n


def _padded(x: jax.Array | None, shape: tuple[int, ...], rank_axis: int, dtype) -> jax.Array:
  """``x`` zero-padded along its rank axis to ``shape`` (zeros for None)."""
  if x is None:
    return jnp.zeros(shape, dtype)
  pad = [(0, 0)] * x.ndim
  pad[rank_axis] = (0, shape[rank_axis] - x.shape[rank_axis])
  return jnp.pad(x, pad)


def stack_adapters(trees: Sequence[PyTree], st: Stack) -> dict:
  """Solo adapter trees (one per adapter, as ``lora.init_adapters`` makes them) as one
  stacked tree."""
  if len(trees) != st.n:
    raise ValueError(f"{len(trees)} adapter trees for a stack of {st.n}")
  solos = [lora.adapter_leaves(t) for t in trees]
  dtype = st.plans[0].spec.dtype
  out = {}
  for path, t in st.targets.items():
    ax = adapter_axis(t)
    a_rank, b_rank = len(t.a_shape) - 1, sum(c in "be" for c in t.layout)  # r's axis
    factors = {}
    for name, shape, rank_axis in (("a", t.a_shape, a_rank), ("b", t.b_shape, b_rank)):
      slices = [_padded(s.get(path, {}).get(name), shape, rank_axis, dtype) for s in solos]
      factors[name] = jnp.stack(slices, axis=ax)
    out[path] = factors
  return unflatten(out)


def init_adapters(params: PyTree, st: Stack, rngs: Sequence[jax.Array]) -> dict:
  """Fresh stacked adapters: adapter ``i`` is ``lora.init_adapters(params, plans[i],
  rngs[i])``, so a stacked run starts where each solo run with that key starts."""
  if len(rngs) != st.n:
    raise ValueError(f"{len(rngs)} keys for a stack of {st.n} adapters")
  return stack_adapters([lora.init_adapters(params, p, k) for p, k in zip(st.plans, rngs)],
                        st)


def unstack(adapters: PyTree, st: Stack, i: int) -> dict:
  """Adapter ``i`` as a solo adapter tree (its own targets and rank): what its run saves,
  exports and merges."""
  flat = lora.adapter_leaves(adapters)
  out = {}
  for path, t in st.plans[i].targets.items():
    ax = adapter_axis(st.targets[path])
    a = jnp.take(flat[path]["a"], i, axis=ax)
    b = jnp.take(flat[path]["b"], i, axis=ax)
    b_rank = b.ndim - len([c for c in t.layout if c == "o"]) - 1
    out[path] = {"a": jax.lax.slice_in_dim(a, 0, t.rank, axis=a.ndim - 1),
                 "b": jax.lax.slice_in_dim(b, 0, t.rank, axis=b_rank)}
  return unflatten(out)


def with_adapters(params: PyTree, adapters: PyTree, st: Stack) -> dict:
  """params with each stacked adapter's factors beside its kernel (``lora_a`` = A,
  ``lora_b`` = B with adapter i's slice times its scale), as ``lora.with_adapters`` does
  for one adapter. Differentiable w.r.t. ``adapters``."""
  flat = flatten(params)
  factors = lora.adapter_leaves(adapters)
  for path, t in st.targets.items():
    if path not in factors:
      raise ValueError(f"stacked adapters have no factors for '{path}'")
    f = factors[path]
    ax = adapter_axis(t)
    n_b = len(t.b_shape) + 1
    scale_shape = [1] * n_b
    scale_shape[ax] = st.n
    scale = jnp.asarray(st.scales[path], f["b"].dtype).reshape(scale_shape)
    scope, _, _ = path.rpartition("/")
    flat[f"{scope}/{LORA_A}"] = f["a"]
    flat[f"{scope}/{LORA_B}"] = f["b"] * scale
  return unflatten(flat)


def swap(params: PyTree, st: Stack, i: int, adapter: PyTree, own: Plan) -> dict:
  """Model params that hold the stack (``with_adapters``: factors beside the kernels, B
  pre-scaled) with slot ``i`` now holding ``adapter`` (a solo adapter tree, resolved as
  ``own``: its targets, ranks and scales), zero-padded to the slot's rank and zero where
  it targets nothing. The shapes stay, so a program compiled for the stack (mixed-adapter
  sampling: ``models.sample(adapter_ids=...)``) runs it without recompiling. One line
  naming the kernel when the adapter does not fit the slots: a target the stack lacks, or
  a rank above the stack's there."""
  if not 0 <= i < st.n:
    raise ValueError(f"slot {i} is not one of the stack's {st.n}")
  for path, t in own.targets.items():
    if path not in st.targets:
      raise ValueError(f"adapter targets '{path}', which the stack's slots do not hold")
    if t.rank > st.targets[path].rank:
      raise ValueError(f"adapter has rank {t.rank} at '{path}', above the slots' "
                       f"{st.targets[path].rank}")
  flat = flatten(params)
  solo = lora.adapter_leaves(adapter)
  for path, t in st.targets.items():
    ax = adapter_axis(t)
    target = own.targets.get(path)
    factors = solo.get(path, {}) if target is not None else {}
    scope, _, _ = path.rpartition("/")
    b_rank = sum(c in "be" for c in t.layout)
    for leaf, name, shape, rank_axis in ((LORA_A, "a", t.a_shape, len(t.a_shape) - 1),
                                         (LORA_B, "b", t.b_shape, b_rank)):
      slots = flat[f"{scope}/{leaf}"]
      x = _padded(factors.get(name), shape, rank_axis, slots.dtype)
      if name == "b" and target is not None:
        x = x * jnp.asarray(target.scale, x.dtype)
      flat[f"{scope}/{leaf}"] = slots.at[(slice(None),) * ax + (i,)].set(x)
  return unflatten(flat)


def with_adapter(params: PyTree, adapters: PyTree, st: Stack, i: jax.Array) -> dict:
  """params with adapter ``i``'s slice of the stacked factors beside each kernel (A, and B
  times its scale), as ``lora.with_adapters`` places one adapter: the model then runs the
  plain LoRA path, for a batch that holds only adapter i's rows. ``i`` may be traced (the
  micro-batches of one step each hold another adapter's rows). Its factors keep the stack's
  rank (zero-padded past its own) and its zeros where it has no target: exact."""
  flat = flatten(params)
  factors = lora.adapter_leaves(adapters)
  for path, t in st.targets.items():
    f = factors[path]
    ax = adapter_axis(t)
    take = lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=ax, keepdims=False)  # noqa: E731
    scale = jnp.asarray(st.scales[path], f["b"].dtype)[i]
    scope, _, _ = path.rpartition("/")
    flat[f"{scope}/{LORA_A}"] = take(f["a"])
    flat[f"{scope}/{LORA_B}"] = take(f["b"]) * scale
  return unflatten(flat)


def adapter_axes(st: Stack) -> dict:
  """The adapter axis of every stacked factor, as a tree shaped like the adapters."""
  return unflatten({path: {"a": adapter_axis(t), "b": adapter_axis(t)}
                    for path, t in st.targets.items()})


def along(values: jax.Array, axis: int, ndim: int) -> jax.Array:
  """A per-adapter vector ``[N]`` shaped to broadcast along ``axis`` of an ``ndim`` array."""
  shape = [1] * ndim
  shape[axis] = values.shape[0]
  return values.reshape(shape)


def sq_norms(tree: PyTree, axes: PyTree, n: int) -> jax.Array:
  """Each adapter's squared L2 norm over all its slices: ``[N]`` f32."""
  def one(x, ax):  # reduce every axis but the adapter axis (no transpose)
    return jnp.sum(jnp.square(x.astype(jnp.float32)),
                   axis=tuple(d for d in range(x.ndim) if d != ax))
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(one, tree, axes))
  return sum(leaves, jnp.zeros((n,), jnp.float32))


class StackAdamState(NamedTuple):
  count: jax.Array  # [N] int32: the steps each adapter has taken
  mu: PyTree
  nu: PyTree


def optimizer(st: Stack, learning_rates: Sequence, *, b_lr_ratios: Sequence[float] | None = None,
              weight_decays: Sequence[float] | None = None,
              max_grad_norms: Sequence[float | None] | None = None, b1: float = 0.9,
              b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW per adapter over a ``{"lora": stacked adapters, "full": {}}`` tree: adapter i's
  slices get exactly what ``optim.optimizer(learning_rates[i], b_lr_ratio=...,
  weight_decay=..., max_grad_norm=...)`` gives its solo adapter: its gradient clipped by
  its own global norm, its own step count (bias correction, schedule), LR (a float or an
  optax schedule), LoRA+ ratio and decoupled weight decay. Moments for every element, as
  for one adapter (padded and untargeted slices keep zero moments: zero gradients)."""
  n = st.n
  per = lambda v, default: list(v) if v is not None else [default] * n
  lrs, ratios = per(learning_rates, None), per(b_lr_ratios, 1.0)
  wds, clips = per(weight_decays, 0.0), per(max_grad_norms, None)
  if len({len(lrs), len(ratios), len(wds), len(clips)} | {n}) != 1:
    raise ValueError(f"per-adapter optimizer settings must each have {n} entries")
  if any(r <= 0 for r in ratios):
    raise ValueError(f"b_lr_ratio must be > 0, got {ratios}")
  axes = {"lora": adapter_axes(st), "full": {}}
  clip = jnp.asarray([jnp.inf if c is None else c for c in clips], jnp.float32)
  wd = jnp.asarray(wds, jnp.float32)

  def lr_vector(count):
    return jnp.stack([jnp.asarray(lr(count[i]) if callable(lr) else lr, jnp.float32)
                      for i, lr in enumerate(lrs)])

  def init(params):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return StackAdamState(jnp.zeros((n,), jnp.int32), zeros,
                          jax.tree_util.tree_map(jnp.zeros_like, params))

  def update(grads, state, params):
    norm = jnp.sqrt(sq_norms(grads, axes, n))
    factor = jnp.where(norm < clip, 1.0, clip / norm)  # optax.clip_by_global_norm's rule
    grads = jax.tree_util.tree_map(
        lambda g, ax: g * along(factor, ax, g.ndim).astype(g.dtype), grads, axes)
    # optax's moments; the bias correction and schedule are per adapter here (each adapter
    # has its own step count), which optax.scale_by_adam's one scalar count cannot express
    mu = optax.tree.update_moment(grads, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(grads, state.nu, b2, 2)
    count = state.count + 1
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    lr = lr_vector(state.count)
    b_lr = lr * jnp.asarray(ratios, jnp.float32)

    def one(path, m, v, p, ax):
      shaped = lambda vec: along(vec, ax, m.ndim).astype(m.dtype)
      u = (m / shaped(c1)) / (jnp.sqrt(v / shaped(c2)) + eps) + shaped(wd) * p
      rate = b_lr if path[-1].key == "b" else lr
      return -shaped(rate) * u

    updates = jax.tree_util.tree_map_with_path(one, mu, nu, params, axes)
    return updates, StackAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def _field(path) -> str | None:
  """The optimizer-state field a leaf sits under (``mu``, ``nu``, ``count``), if any."""
  names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
  return names[-1] if names else None


def _param_path(path) -> str:
  """The parameter path of a moment leaf: the dict keys after its state field."""
  last = max((n for n, k in enumerate(path) if isinstance(k, jax.tree_util.GetAttrKey)),
             default=-1)
  return "/".join(str(k.key) for k in path[last + 1:] if isinstance(k, jax.tree_util.DictKey))


def solo_state(state: dict, st: Stack, i: int, solo_init: Any) -> dict:
  """Adapter i's part of a stacked training state (``{"step", "trainable",
  "opt_state"}`` with ``optimizer``'s state) as the state its solo run would hold: its
  adapter unstacked, and ``solo_init`` (the solo optimizer's ``init`` of that adapter, e.g.
  ``optim.optimizer(...)``) with its moments and step counts filled in. What a run of a
  group checkpoints, so the run resumes, exports and merges alone."""
  opt: StackAdamState = state["opt_state"]
  moments = {name: lora.adapter_leaves(unstack(getattr(opt, name)["lora"], st, i))
             for name in ("mu", "nu")}
  count = opt.count[i]

  def fill(path, leaf):
    field = _field(path)
    if field == "count":
      return jnp.array(count, leaf.dtype)  # a copy each: a donated state holds no alias
    if field in moments:
      kernel, _, factor = _param_path(path).removeprefix("lora/").rpartition("/")
      return moments[field][kernel][factor].astype(leaf.dtype)
    return leaf

  return {"step": jnp.array(count), "trainable": {"lora": unstack(state["trainable"]["lora"], st, i),
                                       "full": {}},
          "opt_state": jax.tree_util.tree_map_with_path(fill, solo_init)}


def stacked_state(solos: Sequence[dict], st: Stack) -> dict:
  """The inverse of ``solo_state``: each run's solo training state (as its checkpoint
  holds it) stacked into one state of ``optimizer``; each adapter keeps its own step
  count."""
  counts, moments = [], {"mu": [], "nu": []}
  for s in solos:
    found = {"mu": {}, "nu": {}}
    count = []

    def collect(path, leaf, found=found, count=count):
      field = _field(path)
      if field == "count":
        count.append(leaf)
      elif field in found and _param_path(path).startswith("lora/"):
        found[field][_param_path(path).removeprefix("lora/")] = leaf
      return leaf

    jax.tree_util.tree_map_with_path(collect, s["opt_state"])
    counts.append(count[0])
    for name in moments:
      moments[name].append(unflatten(found[name]))
  trainable = {"lora": stack_adapters([s["trainable"]["lora"] for s in solos], st),
               "full": {}}
  opt = StackAdamState(jnp.stack([jnp.asarray(c, jnp.int32) for c in counts]),
                       *({"lora": stack_adapters(moments[n], st), "full": {}}
                         for n in ("mu", "nu")))
  return {"step": jnp.max(opt.count), "trainable": trainable, "opt_state": opt}
