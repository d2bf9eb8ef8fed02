"""Where arrays live: the device mesh, one table from logical axes to mesh axes, and the
shardings of parameters, adapters, optimizer state and batches derived from it.

The mesh has axes ("data", "fsdp", "tensor"). Batches are split over data x fsdp; the
frozen base is sharded over "fsdp" on its "embed" axis (FSDP: XLA gathers each layer's
weights where they are used) and over "tensor" on heads / MLP / vocabulary axes. Adapters
follow their kernel (``adapter_specs``: A keeps the kernel's input axes, B its
output axes, the rank axis replicated), and optimizer state follows the adapters
(``state_shardings``). Every sharding decision of the project is made here. One
``jax.jit`` program runs the same on one device, many local devices, or many processes
(``jax.distributed``): nothing here depends on where the devices are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora import lora as lora_lib

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Logical axis (as the models name them) -> mesh axis. Unlisted logical axes replicate.
RULES = (
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("experts", None),
    ("layers", None),
    ("head_dim", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1 for "all remaining devices".

  Attributes:
    data: data-parallel replicas.
    fsdp: shards of the frozen base (and of the batch).
    tensor: tensor-parallel shards of heads / MLP / vocabulary.
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, n_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh sizes {sizes} must be positive (or -1 for the rest)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if n_devices % known:
        raise ValueError(f"mesh sizes {sizes} do not divide the {n_devices} devices")
      sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
      raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                       f"{math.prod(sizes)} devices, but {n_devices} are available")
    return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all, every process)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = config.shape(len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def logical_specs(boxed_params: Any) -> dict[str, P]:
  """{param path: PartitionSpec over mesh axes} from flax's logical-axis metadata."""
  logical = nn.get_partition_spec(boxed_params)
  mesh_specs = nn.logical_to_mesh(logical, RULES)
  flat = {}
  for keypath, spec in jax.tree_util.tree_flatten_with_path(
      mesh_specs, is_leaf=lambda x: isinstance(x, P))[0]:
    flat[lora_lib.path_str(keypath)] = spec if isinstance(spec, P) else P()
  return flat


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drop mesh axes of size 1 and axes that do not divide the dimension they shard
  (that dimension is replicated instead)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
                  if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in names)
    keep = names and dim % size == 0
    out.append((names[0] if len(names) == 1 else names) if keep else None)
  return P(*out)


def param_shardings(specs: dict[str, P], shapes: dict[str, tuple[int, ...]],
                    mesh: Mesh) -> dict[str, NamedSharding]:
  """{path: NamedSharding} for parameters (a mesh axis that does not divide a dim is
  dropped for that dim, e.g. 3 KV heads on a tensor axis of 2)."""
  return {p: NamedSharding(mesh, _fit(specs.get(p, P()), shapes[p], mesh)) for p in shapes}


def adapter_specs(plan: lora_lib.Plan, kernel_specs: dict[str, P]) -> dict[str, dict[str, P]]:
  """{kernel path: {"a", "b": PartitionSpec}} derived from each kernel's spec: A keeps the
  kernel's stacked/expert/input axes, B its stacked/expert/output axes, the rank axis is
  replicated (the b/e/i/o layout letters say which axis is which)."""
  out = {}
  for path, t in plan.targets.items():
    spec = tuple(kernel_specs.get(path, P()))
    roles = list(zip(spec + (None,) * (len(t.shape) - len(spec)), t.layout))
    out[path] = {
        "a": P(*(s for s, c in roles if c in "bei"), None),
        "b": P(*(s for s, c in roles if c in "be"), None, *(s for s, c in roles if c == "o")),
    }
  return out


def adapter_shardings(plan: lora_lib.Plan, kernel_specs: dict[str, P], mesh: Mesh) -> dict:
  """Nested {kernel path: {"a", "b": NamedSharding}} mirroring the adapter tree."""
  fitted = {p: _fit(kernel_specs.get(p, P()), t.shape, mesh) for p, t in plan.targets.items()}
  flat = {}
  for path, ab in adapter_specs(plan, fitted).items():
    t = plan.targets[path]
    flat[f"{path}/a"] = NamedSharding(mesh, _fit(ab["a"], t.a_shape, mesh))
    flat[f"{path}/b"] = NamedSharding(mesh, _fit(ab["b"], t.b_shape, mesh))
  return lora_lib.unflatten(flat)


def state_shardings(tx: optax.GradientTransformation, trainable: Any, mesh: Mesh) -> dict:
  """Shardings of a training state ``{"step", "trainable", "opt_state"}``: the trainable
  leaves keep theirs, optimizer moments follow the leaf they belong to
  (``optax.tree_map_params``), everything else (step counts) is replicated."""
  everywhere = replicated(mesh)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # multi_transform's "no state here"
  opt = optax.tree_map_params(
      tx, lambda leaf, sh: leaf if masked(leaf) else sh, jax.eval_shape(tx.init, trainable),
      shardings_of(trainable), transform_non_params=lambda _: everywhere, is_leaf=masked)
  return {"step": everywhere, "trainable": shardings_of(trainable), "opt_state": opt}


def shardings_of(tree: Any) -> Any:
  """The sharding of every array in ``tree``."""
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def place_like(tree: Any, like: Any) -> Any:
  """``tree``'s leaves (host arrays) placed with the sharding and dtype of ``like``'s leaf
  at the same path; a leaf that *is* ``like``'s is kept as it is."""
  old = lora_lib.flatten(like)
  return lora_lib.unflatten({
      p: x if x is old[p] else jax.device_put(np.asarray(x, old[p].dtype), old[p].sharding)
      for p, x in lora_lib.flatten(tree).items()})


def traced_in(fn, mesh) -> Any:
  """``fn`` traced with ``mesh`` as the context mesh (``jax.sharding.use_abstract_mesh``), so
  code inside it that XLA cannot partition by itself finds the mesh (``over_batch_shards``)."""
  abstract = mesh.abstract_mesh

  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(abstract):
      return fn(*args, **kwargs)
  return wrapped


def over_batch_shards(fn, n_args: int, rows: int) -> Any:
  """``fn(rows_arg, *whole_args)`` run per batch shard of the context mesh (``shard_map``):
  its first argument and its result split on their leading axis of ``rows`` over data x
  fsdp, the other arguments gathered whole on every device (as FSDP gathers a layer's
  weights; a tensor-parallel axis is gathered too). For computations XLA cannot partition
  itself: Mosaic (TPU) and Triton (GPU) kernels. ``fn`` unchanged outside a mesh context
  (``traced_in``) or on one device; rows that do not split evenly run whole everywhere."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn
  axes = tuple(a for a in BATCH if a in mesh.axis_names and mesh.shape[a] > 1)
  shards = math.prod(mesh.shape[a] for a in axes)
  row_spec = P(axes) if axes and rows % shards == 0 else P()
  # check_vma=False: Pallas calls carry no varying-axes annotations; the cotangents of the
  # whole (unmapped) arguments are summed over the shards by shard_map's transpose.
  return jax.shard_map(fn, mesh=mesh, in_specs=(row_spec,) + (P(),) * (n_args - 1),
                       out_specs=row_spec, check_vma=False)


def single_device_mesh() -> Mesh:
  """A 1x1x1 mesh over the first device (scripts, notebooks, benchmarks)."""
  return make_mesh(MeshConfig(), jax.devices()[:1])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays: leading axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each host's slice of the batch into global arrays
  (``jax.make_array_from_process_local_data``); the global batch must divide data x fsdp."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  out = {}
  for name, x in local.items():
    x = np.asarray(x)
    global_rows = x.shape[0] * jax.process_count()
    if global_rows % shards:
      raise ValueError(f"batch of {global_rows} rows ('{name}') is not divisible by the "
                       f"{shards} data x fsdp shards of the mesh")
    out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return out


def place(tree: Any, shardings: dict[str, NamedSharding]) -> dict:
  """Put each leaf of a nested dict on its sharding (paths as in ``lora.flatten``). Every
  process holds the same full values (e.g. loaded from the same checkpoint) and keeps only
  the shards of its own devices."""
  flat = lora_lib.flatten(tree)
  return lora_lib.unflatten({p: _from_host(x, shardings[p]) for p, x in flat.items()})


def _from_host(x, sharding: NamedSharding) -> jax.Array:
  """A host array on ``sharding``: each device gets only its own shard."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.asarray(x)[idx])


def place_leaf(x: Any, spec: P | None, mesh: Mesh) -> Any:
  """One host parameter on ``mesh``, sharded by its kernel's ``spec`` (fitted to its
  shape). A quantised kernel's codes and scales are each sharded like the kernel (an axis
  they cannot split evenly, e.g. int8's one scale row, is replicated)."""
  spec = spec or P()
  return jax.tree.map(lambda a: _from_host(a, NamedSharding(mesh, _fit(spec, a.shape, mesh))),
                      x)
