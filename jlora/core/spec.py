"""What gets a LoRA adapter and how it is shaped: target rules, ``LoraSpec``, the resolved
``Target`` of each kernel, and ``Plan``, a spec resolved once against a model.

Resolving walks the whole parameter tree and checks every rule, so a run does it once
(``plan(params, spec)``) and passes the ``Plan`` on: the advisor, the shardings, the train
step and generation all read the same targets. Anything that takes a spec takes a Plan.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora.core.tree import flatten

PyTree = Any

# Name fragments of the usual Flax/HF-style module names. A path component must equal one of
# these (not merely contain it) for a kernel to count as attention or MLP.
ATTN_NAMES = ("attn", "attention", "self_attn", "self_attention", "q_proj", "k_proj",
              "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "out", "wq", "wk",
              "wv", "wo", "wqkv", "q", "k", "v", "o")
MLP_NAMES = ("mlp", "ffn", "feed_forward", "feedforward", "moe", "experts", "expert",
             "gate_proj", "up_proj", "down_proj", "gate", "up", "down", "w1", "w2", "w3",
             "wi", "wi_0", "wi_1", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h")
# Never targeted by the "all" preset: the unembedding (opt in with a rule such as
# "lm_head") and MoE routers (tiny, and routing stays the base model's).
UNEMBED_NAMES = ("lm_head", "unembed", "unembedding", "output_projection")
ROUTER_NAMES = ("router",)
PRESETS = ("all", "mlp", "attn")
# Names under which ``with_adapters`` places the factors beside a kernel.
LORA_A, LORA_B = "lora_a", "lora_b"
LAYOUT_ROLES = "beio"


def _component_re(names: Sequence[str]) -> re.Pattern:
  return re.compile(r"(^|/)(" + "|".join(map(re.escape, names)) + r")(/|$)")


_ATTN_RE, _MLP_RE = _component_re(ATTN_NAMES), _component_re(MLP_NAMES)
_EXCLUDED_RE = _component_re(UNEMBED_NAMES + ROUTER_NAMES)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One target rule: a preset name or a regex searched in "/"-joined kernel paths.

  Attributes:
    pattern: "all", "mlp", "attn", or a regex (``re.search``) over the paths of
      parameters of rank >= 2 (biases and norms never take an adapter).
    rank: overrides the spec's rank for the kernels this rule selects.
    alpha: overrides the spec's alpha for those kernels.
  """
  pattern: str
  rank: int | None = None
  alpha: float | None = None

  def matches(self, path: str) -> bool:
    if self.pattern in PRESETS:
      if not path.endswith("kernel") or _EXCLUDED_RE.search(path):
        return False
      if self.pattern == "mlp":
        return bool(_MLP_RE.search(path))
      if self.pattern == "attn":
        return bool(_ATTN_RE.search(path))
      return True
    return re.search(self.pattern, path) is not None


@dataclasses.dataclass(frozen=True)
class Target:
  """A resolved adapter: where it goes and how it is shaped and scaled."""
  path: str
  shape: tuple[int, ...]
  layout: str
  rank: int
  alpha: float
  scale: float

  @property
  def a_shape(self) -> tuple[int, ...]:
    return tuple(d for d, c in zip(self.shape, self.layout) if c in "bei") + (self.rank,)

  @property
  def b_shape(self) -> tuple[int, ...]:
    stack = tuple(d for d, c in zip(self.shape, self.layout) if c in "be")
    return stack + (self.rank,) + tuple(d for d, c in zip(self.shape, self.layout) if c == "o")

  @property
  def fan_in(self) -> int:
    return math.prod(d for d, c in zip(self.shape, self.layout) if c == "i")

  @property
  def fan_out(self) -> int:
    return math.prod(d for d, c in zip(self.shape, self.layout) if c == "o")

  @property
  def num_params(self) -> int:
    return math.prod(self.a_shape) + math.prod(self.b_shape)

  def delta_equation(self) -> str:
    """einsum equation ``A, B -> delta W`` in the kernel's own axis order."""
    letters = "abcdefghijklmnopqrstuvwxy"[:len(self.shape)]
    a = "".join(l for l, c in zip(letters, self.layout) if c in "bei") + "z"
    b = ("".join(l for l, c in zip(letters, self.layout) if c in "be") + "z" +
         "".join(l for l, c in zip(letters, self.layout) if c == "o"))
    return f"{a},{b}->{letters}"


def _as_rules(targets) -> tuple[Rule, ...]:
  if targets is None:  # no adapters at all: full fine-tuning through ``full``
    return ()
  if isinstance(targets, (str, Rule)):
    targets = (targets,)
  rules = []
  for t in targets:
    if isinstance(t, str):
      t = Rule(t)
    if not isinstance(t, Rule):
      raise ValueError(f"LoRA target {t!r} is not a preset name, regex or Rule")
    if t.pattern not in PRESETS:
      try:
        re.compile(t.pattern)
      except re.error as e:
        raise ValueError(f"LoRA target {t.pattern!r} is not a valid regex: {e}") from None
    rules.append(t)
  if not rules:
    raise ValueError("LoRA targets are empty: give a preset (all, mlp, attn) or a regex")
  return tuple(rules)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What gets adapters and how they are parametrised (hashable: usable as a jit static).

  Attributes:
    rank: adapter rank r (>= 1); per expert for MoE it is ``rank // active_experts``.
    alpha: W' = W + alpha/r B A. Kept constant across ranks (FINDINGS: alpha = 32).
    targets: preset ("all", "mlp", "attn"), regex, Rule, or a sequence of them. The first
      rule matching a kernel decides its rank/alpha; every rule must match something.
      None: no adapters (with ``full=(".*",)``: full fine-tuning through the same code).
    rslora: scale by alpha/sqrt(r) instead of alpha/r.
    dtype: dtype of the adapter factors (f32 default, whatever the base dtype is).
    full: regexes of parameters trained in full (like PEFT's modules_to_save).
    layouts: {regex: layout} for kernels that are not plain 2-D ``[in, out]``.
    active_experts: experts routed per token; divides the rank of "e" layouts.
  """
  rank: int
  alpha: float = 32.0
  targets: Any = "all"
  rslora: bool = False
  dtype: Any = jnp.float32
  full: tuple[str, ...] = ()
  layouts: Any = ()
  active_experts: int = 1

  @classmethod
  def full_fine_tuning(cls) -> "LoraSpec":
    """Full fine-tuning through the same code: every parameter trained in full, no
    adapters (``train.method = "full"``)."""
    return cls(rank=1, targets=None, full=(".*",))

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("targets", _as_rules(self.targets))
    set_("full", (self.full,) if isinstance(self.full, str) else tuple(self.full))
    layouts = self.layouts.items() if isinstance(self.layouts, Mapping) else self.layouts
    set_("layouts", tuple((str(k), str(v)) for k, v in layouts))
    set_("dtype", jnp.dtype(self.dtype))
    for name, value in [("rank", self.rank)] + [("rank", r.rank) for r in self.targets]:
      if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"LoRA {name} must be an integer >= 1, got {value!r}")
    for alpha in [self.alpha] + [r.alpha for r in self.targets if r.alpha is not None]:
      if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if self.active_experts < 1:
      raise ValueError(f"active_experts must be >= 1, got {self.active_experts!r}")
    for pattern, layout in self.layouts:
      if not layout or set(layout) - set(LAYOUT_ROLES) or "i" not in layout or "o" not in layout:
        raise ValueError(f"layout {layout!r} for {pattern!r} must use the letters "
                         f"'{LAYOUT_ROLES}' with at least one 'i' and one 'o'")
    if not jnp.issubdtype(self.dtype, jnp.floating):
      raise ValueError(f"LoRA dtype must be floating, got {self.dtype}")

  def with_layouts(self, layouts: Mapping[str, str]) -> "LoraSpec":
    """A copy with extra ``{regex: layout}`` entries (e.g. from ``jlora.linen_layouts``)."""
    return dataclasses.replace(self, layouts=tuple(self.layouts) + tuple(layouts.items()))

  def layout_for(self, path: str, shape: tuple[int, ...]) -> str:
    for pattern, layout in self.layouts:
      if re.search(pattern, path):
        if len(layout) != len(shape):
          raise ValueError(f"layout {layout!r} does not fit '{path}' of shape {shape}")
        return layout
    if len(shape) == 2:
      return "io"
    raise ValueError(
        f"kernel '{path}' has shape {shape}: say which axes are inputs with "
        f"layouts={{'{path}': '...'}} (letters b=stacked, e=expert, i=in, o=out), or find "
        "them from the model with jlora.linen_layouts / jlora.nnx_layouts")

  def scale_for(self, rank: int, alpha: float) -> float:
    return alpha / math.sqrt(rank) if self.rslora else alpha / rank


# ----------------------------------------------------------------------------- resolve

def resolve(params: PyTree, spec: LoraSpec | Plan) -> dict[str, Target]:
  """Every targeted kernel path -> its Target. Validates rules and shapes. A Plan's
  targets are returned as they are (resolved once, when the plan was made)."""
  if isinstance(spec, Plan):
    return dict(spec.targets)
  flat = flatten(params)
  used = [False] * len(spec.targets)
  targets = {}
  for path, leaf in flat.items():
    for i, rule in enumerate(spec.targets):
      if len(leaf.shape) < 2:  # biases, norms, scalars never take an adapter
        continue
      if rule.matches(path):
        used[i] = True
        targets[path] = _target(path, tuple(leaf.shape), rule, spec)
        break
  _check_rules_used(spec, used, flat)
  _check_full_rules(spec, flat, targets)
  return targets


def _target(path: str, shape: tuple[int, ...], rule: Rule, spec: LoraSpec) -> Target:
  layout = spec.layout_for(path, shape)
  rank = rule.rank or spec.rank
  if "e" in layout:
    rank = rank // spec.active_experts
    if rank < 1:
      raise ValueError(f"rank {rule.rank or spec.rank} for '{path}' is smaller than "
                       f"active_experts={spec.active_experts}: no rank left per expert")
  alpha = rule.alpha or spec.alpha
  target = Target(path, shape, layout, rank, alpha, spec.scale_for(rank, alpha))
  if rank > min(target.fan_in, target.fan_out):
    raise ValueError(f"LoRA rank {rank} exceeds min(fan_in={target.fan_in}, "
                     f"fan_out={target.fan_out}) of '{path}' {shape}")
  return target


def _check_rules_used(spec: LoraSpec, used: list[bool], flat: Mapping[str, Any]) -> None:
  for rule, ok in zip(spec.targets, used):
    if not ok:
      example = next((p for p in flat if p.endswith("kernel")), next(iter(flat), "<empty>"))
      raise ValueError(
          f"LoRA target rule {rule.pattern!r} matched no parameter (presets: "
          f"{', '.join(PRESETS)}; or a regex over paths such as '{example}')")


def _check_full_rules(spec: LoraSpec, flat: Mapping[str, Any], targets) -> None:
  for pattern in spec.full:
    hits = [p for p in flat if re.search(pattern, p)]
    if not hits:
      raise ValueError(f"full-training rule {pattern!r} matched no parameter")
    both = [p for p in hits if p in targets]
    if both:
      raise ValueError(f"parameter '{both[0]}' is both a LoRA target and fully trained "
                       f"(rule {pattern!r}); each parameter needs exactly one rule")


def is_full(path: str, spec: LoraSpec | Plan) -> bool:
  """Whether a parameter is trained in full (``spec.full``)."""
  return any(re.search(p, path) for p in spec_of(spec).full)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """A LoraSpec resolved against one model's parameter shapes (``plan``): built once per
  run and passed wherever a spec goes, so the target table is never rebuilt.

  Attributes:
    spec: the LoraSpec.
    targets: {kernel path: Target} for every adapted kernel.
  """
  spec: LoraSpec
  targets: Mapping[str, Target]

  @property
  def adapter_params(self) -> int:
    return sum(t.num_params for t in self.targets.values())


def plan(params: PyTree, spec: LoraSpec | Plan) -> Plan:
  """Resolve ``spec`` against ``params`` (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
  if isinstance(spec, Plan):
    return spec
  return Plan(spec, resolve(params, spec))


def spec_of(spec: LoraSpec | Plan) -> LoraSpec:
  """The LoraSpec of a spec or a Plan."""
  return spec.spec if isinstance(spec, Plan) else spec

