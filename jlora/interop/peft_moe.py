"""MoE expert adapters in PEFT's two layouts.

- per expert (what ``jlora.interop.peft`` writes by default, and what serving engines load):
  2-D factors per expert module, ``mlp.experts.{e}.{gate,up,down}_proj.lora_{A,B}``;
- fused (PEFT >= 0.17 ``target_parameters`` on transformers' fused expert tensors
  ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]):
  A is [r*E, in] with expert-major rows, B is [out, r*E] with rank-major columns, so expert
  e's delta is sum_k B[:, k*E + e] A[e*r + k]; gate and up share one A.

``unfuse`` reads the fused layout as per-expert factors; ``fuse`` writes it.
"""

from __future__ import annotations

import re

import numpy as np

from jlora.models.config import ModelConfig

PREFIX = "base_model.model."
GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


def pattern_value(patterns: dict, module: str, default):
  """PEFT's rule (``peft.utils.other.get_pattern_key``): the first key that matches the
  end of the module name, else the default."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def module_scale(config: dict, module: str, rank: int) -> float:
  """PEFT's scale of ``module``'s factors of ``rank`` under adapter config ``config``: its
  alpha (``alpha_pattern`` or ``lora_alpha``) over the rank (rsLoRA: its square root)."""
  alpha = float(pattern_value(config.get("alpha_pattern"), module,
                              config.get("lora_alpha", 8)))
  return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def targets(name: str, entries) -> bool:
  """PEFT's ``target_parameters`` rule (``BaseTuner._inject_parameters``): a parameter is
  targeted by an entry equal to its name or a dotted suffix of it (``gate_up_proj``,
  ``mlp.experts.gate_up_proj``, ``model.layers.3.mlp.experts.gate_up_proj``)."""
  return any(name == e or name.endswith("." + e) for e in entries)


def partial_layers(config: dict) -> bool:
  """Whether an adapter may cover a module in some layers only, as PEFT writes it where
  ``layers_to_transform``, a regex ``target_modules`` or per-layer target names choose
  layers (the missing layers' factors are zero: exact)."""
  names = list(config.get("target_parameters") or [])
  modules = config.get("target_modules")
  names += modules if isinstance(modules, list) else []
  return bool(config.get("layers_to_transform")) or isinstance(modules, str) or any(
      re.search(r"(^|\.)layers\.\d+\.", n) for n in names)


_FUSED = re.compile(r"(.+\.mlp\.experts)((?:\.base_layer)*)\.lora_([AB])(?:\.[\w-]+)?\.weight")


def unfuse(file: str, stored: dict, config: dict, cfg: ModelConfig) -> dict:
  """PEFT's ``target_parameters`` LoRA on fused expert tensors (transformers' Qwen3-MoE
  ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]) rewritten as the
  per-expert 2-D factors jlora reads (``experts.{e}.{gate,up,down}_proj``). PEFT's layout:
  A is [r*E, in] with expert-major rows, B is [out, r*E] with rank-major columns, so
  expert e's delta is B[:, k*E + e] A[e*r + k] over k; gate and up share A_e and take the
  first and last I rows of B_e. Which wrapper (``.base_layer`` hops) holds which tensor
  follows PEFT's wrapping order, so each is told apart by its shapes instead: A's input
  is H for gate_up and I for down, B's output 2I and H."""
  params = config.get("target_parameters") or []
  if not params:
    return stored
  E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
  fused = [f"model.layers.{i}.{n}" for i in range(cfg.num_layers) for n in (GATE_UP, DOWN)]
  for entry in params:
    if not E or not any(targets(name, [entry]) for name in fused):
      raise ValueError(f"{file}: target_parameters entry {entry!r} matches none of the fused "
                       f"MoE expert tensors jlora reads (model.layers.N.{GATE_UP}, "
                       f"model.layers.N.{DOWN})")
  pairs: dict[tuple, dict] = {}
  out = {}
  for key, value in stored.items():
    m = _FUSED.fullmatch(key[len(PREFIX):] if key.startswith(PREFIX) else key)
    if m is None:
      out[key] = value
      continue
    pairs.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = (key, value)
  for (module, _), f in sorted(pairs.items()):
    if set(f) != {"A", "B"}:
      raise ValueError(f"{file}: '{module}' has lora_{next(iter(f))} without its pair")
    (key_a, a), (_, b) = f["A"], f["B"]
    r = a.shape[0] // E
    if a.shape[0] != r * E or b.shape[1] != r * E:
      raise ValueError(f"{file}: '{key_a}' has {a.shape[0]} rows, not rank x {E} experts")
    a_e = a.reshape(E, r, a.shape[1])  # expert-major rows
    b_e = b.reshape(b.shape[0], r, E).transpose(2, 0, 1)  # rank-major columns -> [E, out, r]
    if (a.shape[1], b.shape[0]) == (H, 2 * I):
      param, parts = "gate_up_proj", {"gate_proj": (a_e, b_e[:, :I]),
                                      "up_proj": (a_e, b_e[:, I:])}
    elif (a.shape[1], b.shape[0]) == (I, H):
      param, parts = "down_proj", {"down_proj": (a_e, b_e)}
    else:
      raise ValueError(f"{file}: '{key_a}' fits neither gate_up_proj [{2 * I}, {H}] nor "
                       f"down_proj [{H}, {I}] of this model's experts")
    # PEFT scales by the alpha its patterns give the fused tensor's name; jlora's reader
    # (``peft._stack``) matches the patterns against the per-expert names: the ratio is
    # folded into B (exact)
    scale = module_scale(config, f"{module}.{param}", r)
    for name, (pa, pb) in parts.items():
      for e in range(E):
        stem = f"{PREFIX}{module}.{e}.{name}"
        fold = scale / module_scale(config, stem[len(PREFIX):], r)
        out[f"{stem}.lora_A.weight"] = pa[e]
        out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(pb[e] * np.float32(fold))
  return out


_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj")


def fuse(tensors: dict, config: dict, scales: dict[str, float], cfg: ModelConfig
         ) -> tuple[dict, dict]:
  """Per-expert PEFT tensors (``tensors``: key -> array; ``scales``: module -> its LoRA
  scale) rewritten in the fused layout, with the adapter_config fields that go with it.

  Gate and up get one A: [A_gate; A_up] with B block-diagonal (exact). PEFT gives every
  module one rank and scale from ``r`` / ``lora_alpha``, so all factors are zero-padded to
  the largest rank R and each module's own scale is folded into its B, with r =
  lora_alpha = R (scale 1; rsLoRA off): exact for every module. With both tensors
  targeted, PEFT nests its wrappers in ``target_parameters`` order (down_proj first):
  down_proj's factors are ``experts.lora_*``, gate_up's ``experts.base_layer.lora_*``."""
  E, I = cfg.num_experts, cfg.moe_intermediate_size
  modules: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # module -> (A [r, in], s B [out, r])
  for key, value in tensors.items():
    module, which = key[len(PREFIX):].rsplit(".lora_", 1)
    a, b = modules.get(module, (None, None))
    modules[module] = (value, b) if which.startswith("A") else (a, value * scales[module])
  experts: dict[str, dict[str, list]] = {}  # layer's experts module -> tensor -> per expert
  plain = {}
  for module, (a, b) in modules.items():
    m = _EXPERT.fullmatch(module)
    if m is None:
      plain[module] = (a, b)
      continue
    experts.setdefault(m.group(1), {}).setdefault(m.group(3), [None] * E)[int(m.group(2))] = \
        (a, b)
  fused = {}
  for module, parts in experts.items():
    if "gate" in parts or "up" in parts:
      fused[(module, GATE_UP)] = [_gate_up(parts, e, I) for e in range(E)]
    if "down" in parts:
      fused[(module, DOWN)] = parts["down"]
  R = max(a.shape[0] for a, _ in [*plain.values(),
                                   *(p for ps in fused.values() for p in ps)])
  out = {}
  for module, (a, b) in plain.items():
    out[f"{PREFIX}{module}.lora_A.weight"], out[f"{PREFIX}{module}.lora_B.weight"] = \
        _pad(a, b, R)
  targets = sorted({name for _, name in fused})
  for (module, name), per_expert in fused.items():
    padded = [_pad(a, b, R) for a, b in per_expert]
    hop = ".base_layer" if name == GATE_UP and len(targets) == 2 else ""
    out[f"{PREFIX}{module}{hop}.lora_A.weight"] = np.concatenate([a for a, _ in padded])
    out[f"{PREFIX}{module}{hop}.lora_B.weight"] = np.ascontiguousarray(
        np.stack([b for _, b in padded], axis=2).reshape(padded[0][1].shape[0], R * E))
  fields = {"r": R, "lora_alpha": R, "use_rslora": False, "rank_pattern": {},
            "alpha_pattern": {}, "target_parameters": targets,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in plain}) or None}
  return out, {**config, **fields}


def _gate_up(parts: dict, e: int, I: int) -> tuple[np.ndarray, np.ndarray]:
  """Expert e's gate_up factors: A = [A_gate; A_up], B = [[B_gate, 0], [0, B_up]] (a part
  not adapted contributes rank 0)."""
  gate, up = (parts[k][e] if k in parts else None for k in ("gate", "up"))
  ref = gate if gate is not None else up
  empty = (np.zeros((0, ref[0].shape[1]), np.float32), np.zeros((I, 0), np.float32))
  (ag, bg), (au, bu) = gate if gate is not None else empty, up if up is not None else empty
  a = np.concatenate([ag, au])
  b = np.zeros((2 * I, a.shape[0]), np.float32)
  b[:I, :ag.shape[0]], b[I:, ag.shape[0]:] = bg, bu
  return a, b


def _pad(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """A [r, in] and B [out, r] zero-padded to ``rank`` (exact: the extra terms are 0)."""
  r = a.shape[0]
  return (np.ascontiguousarray(np.pad(a, ((0, rank - r), (0, 0)))),
          np.ascontiguousarray(np.pad(b, ((0, 0), (0, rank - r)))))
