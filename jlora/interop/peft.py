"""PEFT LoRA adapters, out and in: Hugging Face PEFT's adapter format
(adapter_config.json + adapter_model.safetensors) from and to jlora's adapter trees.

- ``save_peft``: jlora adapters -> ``adapter_model.safetensors`` + ``adapter_config.json``
  (HF module names, ``lora_A`` [r, in] / ``lora_B`` [out, r], per-module rank/alpha in
  ``rank_pattern``/``alpha_pattern``, fully trained modules as ``modules_to_save``; MoE
  experts under the per-expert 2-D names serving engines load).
- ``load_peft``: a PEFT LoRA adapter -> (adapters, spec, params) for jlora: evaluate it, or
  continue training from it (``lora.init`` in a run config).

The name table is ``jlora.models.hf.entries`` (the same one the checkpoint loader and the
merged export read), so they can never disagree about a tensor's name or orientation.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jlora.core import lora as lora_lib
from jlora.infra import fs
from jlora.interop import peft_moe
from jlora.models import hub
from jlora.models import hf
from jlora.models.config import ModelConfig

PREFIX = peft_moe.PREFIX  # every PEFT key starts with it
_pattern_value, module_scale = peft_moe.pattern_value, peft_moe.module_scale
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
MOE_LAYOUTS = ("per-expert", "fused")
# PEFT options whose adapters do not compute W + s B A on nn.Linear weights.
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "use_qalora": "QALoRA",
               "trainable_token_indices": "trainable tokens", "megatron_config": "Megatron",
               "alora_invocation_tokens": "aLoRA"}


def _short(module: str) -> str:
  return module.rsplit(".", 1)[-1]


def peft_tensors(adapters, spec: lora_lib.LoraSpec, cfg: ModelConfig, full: dict | None = None,
                 moe_layout: str = "per-expert") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(safetensors dict, adapter_config fields) of jlora adapters in PEFT's format.

  Args:
    adapters: jlora adapter tree (``{kernel path: {"a", "b"}}``, stacked over layers).
    spec: the LoraSpec they were made with.
    cfg: the base model's config (names and stacking).
    full: ``{jlora path: array}`` of fully trained parameters (``modules_to_save``).
    moe_layout: "per-expert" (2-D factors per expert module, what serving engines load)
      or "fused" (PEFT's ``target_parameters`` on transformers' fused expert tensors).
  """
  if moe_layout not in MOE_LAYOUTS:
    raise ValueError(f"--moe-layout {moe_layout!r} is not one of {', '.join(MOE_LAYOUTS)}")
  from jlora import models
  targets = models.abstract_plan(cfg, spec).targets
  by_path: dict[str, list] = {}
  for entry, index, name in hf.tensor_names(cfg):
    by_path.setdefault(entry.path, []).append((entry, index, name))
  tensors, ranks, alphas, short_names, scales = {}, {}, {}, set(), {}
  for path, f in lora_lib.adapter_leaves(adapters).items():
    t = targets.get(path)
    if t is None or path not in by_path or not by_path[path][0][0].transpose:
      raise ValueError(f"adapter on '{path}' has no Hugging Face module to export to")
    a, b = np.asarray(f["a"], np.float32), np.asarray(f["b"], np.float32)
    for _, index, name in by_path[path]:
      module = hf.module_name(name)
      scales[module] = t.scale
      tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a[index].T)
      tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[index].T)
    # One pattern per jlora path, matching its module in every layer (and expert).
    pattern = re.escape(hf.module_name(by_path[path][0][0].hf)).replace(
        re.escape("{layer}"), r"\d+").replace(re.escape("{expert}"), r"\d+")
    ranks[pattern], alphas[pattern] = t.rank, t.alpha
    short_names.add(_short(hf.module_name(by_path[path][0][2])))
  if not tensors:
    raise ValueError("no adapters to export (a full fine-tuning run: use `jlora merge`)")
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
      "lora_alpha": spec.alpha, "target_modules": sorted(short_names),
      "rank_pattern": {k: v for k, v in ranks.items() if v != spec.rank},
      "alpha_pattern": {k: v for k, v in alphas.items() if v != spec.alpha},
      "use_rslora": spec.rslora, "bias": "none", "lora_dropout": 0.0,
      "fan_in_fan_out": False, "inference_mode": True}
  if moe_layout == "fused" and cfg.num_experts:
    tensors, config = peft_moe.fuse(tensors, config, scales, cfg)
  modules_to_save = []
  for path, value in (full or {}).items():
    if path not in by_path:
      raise ValueError(f"fully trained parameter '{path}' has no Hugging Face name")
    value = np.asarray(value, np.float32)
    for entry, index, name in by_path[path]:
      tensors[PREFIX + name] = np.ascontiguousarray(value[index].T if entry.transpose
                                                    else value[index])
      if hf.module_name(name) not in modules_to_save:
        modules_to_save.append(hf.module_name(name))
  return tensors, {**config, "modules_to_save": modules_to_save or None}


def save_peft(out: str, adapters, spec: lora_lib.LoraSpec, cfg: ModelConfig, *,
              full: dict | None = None, base_model: str | None = None,
              revision: str | None = None, moe_layout: str = "per-expert") -> str:
  """Write a PEFT adapter directory at ``out`` (must not exist, or be empty);
  ``base_model``/``revision``: what PEFT records as the base (``hub.base_name``);
  ``moe_layout`` as in ``peft_tensors``."""
  tensors, config = peft_tensors(adapters, spec, cfg, full, moe_layout)
  config["base_model_name_or_path"] = base_model
  if revision:
    config["revision"] = revision
  with fs.staging(out) as tmp:
    save_file(tensors, os.path.join(tmp, ADAPTER_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2)
  return out


def read_config(path: str) -> dict:
  """A PEFT adapter directory's (or Hub id's) adapter_config.json, refused if it is not
  plain LoRA."""
  path = hub.resolve(path, adapter=True)
  config, file = hf.read_json(path, CONFIG_FILE, "a PEFT adapter directory")
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{file}: peft_type {config.get('peft_type')!r} is not supported "
                     "(only LORA)")
  for key, what in UNSUPPORTED.items():
    if config.get(key):
      raise ValueError(f"{file}: {what} ({key}={config[key]!r}) is not supported")
  if config.get("bias", "none") != "none":
    raise ValueError(f"{file}: bias={config['bias']!r} is not supported (only 'none')")
  if config.get("fan_in_fan_out"):
    raise ValueError(f"{file}: fan_in_fan_out=true (Conv1D weights) is not supported")
  return config


def _read_tensors(path: str) -> tuple[str, dict[str, np.ndarray]]:
  file = os.path.join(path, ADAPTER_FILE)
  if not os.path.isfile(file):
    raise ValueError(f"{path}: no {ADAPTER_FILE}")
  try:
    handle = safe_open(file, framework="numpy")
    return file, {k: handle.get_tensor(k) for k in handle.keys()}
  except Exception as e:  # safetensors raises its own error types for a damaged file
    raise ValueError(f"{file}: cannot read safetensors ({e})") from None


def _sort_tensors(file: str, stored: dict, modules: dict, flat_params: dict,
                  cfg: ModelConfig) -> tuple[dict, dict]:
  """(LoRA factors by jlora path -> layer index -> {"A"/"B": (key, array)}, fully
  trained parameters by jlora path), every tensor checked against the base."""
  factors: dict[str, dict[tuple, dict]] = {}
  full: dict[str, np.ndarray] = {}
  for key, value in stored.items():
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", name)
    if m is None:  # a modules_to_save tensor: the whole trained weight
      module = hf.module_name(name)
      if module not in modules or not name.endswith(".weight"):
        raise ValueError(f"{file}: tensor '{key}' is not a LoRA factor or a weight of this "
                         f"{cfg.model_type} model")
      entry, index = modules[module]
      target = flat_params[entry.path]
      want = target.shape[len(index):]
      got = value.T if entry.transpose else value
      if got.shape != want:
        raise ValueError(f"{file}: tensor '{key}' has shape {value.shape}; the base model's "
                         f"'{name}' has {want[::-1] if entry.transpose else want}")
      full.setdefault(entry.path, np.array(target, np.float32))[index] = got
      continue
    module, which = m.groups()
    if module not in modules or not modules[module][0].transpose:
      raise ValueError(f"{file}: unknown target module '{module}' (not a linear layer of "
                       f"this {cfg.model_type} model)")
    entry, index = modules[module]
    factors.setdefault(entry.path, {}).setdefault(index, {})[which] = (key, value)
  return factors, full


def _stack(file: str, path: str, slices: dict, target: lora_lib.Target, names: dict,
           config: dict, layouts: lora_lib.LoraSpec) -> tuple[dict, int, float]:
  """One jlora path's per-layer (per-expert) PEFT factors stacked as jlora's A and B:
  ``({"a", "b"}, rank, alpha)``. Ranks are zero-padded to the largest and each slice's
  scale difference folded into its B (exact: s_i B_i A_i = s (B_i s_i / s) A_i); layers
  an adapter that chooses layers (``peft_moe.partial_layers``) leaves out get zeros."""
  stack = tuple(d for d, c in zip(target.shape, target.layout) if c in "be")
  per_slice = {}
  for index in np.ndindex(*stack):
    name = names[(path, index)]
    module = hf.module_name(name)
    got = slices.get(index, {})
    if not got and peft_moe.partial_layers(config):
      continue  # a layer the adapter leaves alone (layers_to_transform, ...): zero factors
    for which in "AB":
      if which not in got:
        raise ValueError(f"{file}: '{PREFIX}{module}.lora_{which}.weight' is missing "
                         f"(the adapter covers {path.split('/')[-2]} in some layers only)")
    (ka, a), (kb, b) = got["A"], got["B"]
    r = a.shape[0]
    if a.shape != (r, target.fan_in):
      raise ValueError(f"{file}: tensor '{ka}' has shape {a.shape}; the base model's "
                       f"'{name}' takes {target.fan_in} inputs (expected ({r}, "
                       f"{target.fan_in}))")
    if b.shape != (target.fan_out, r):
      raise ValueError(f"{file}: tensor '{kb}' has shape {b.shape}; expected "
                       f"({target.fan_out}, {r}) for the base model's '{name}'")
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, target.alpha))
    per_slice[index] = (a, b, r, alpha, layouts.scale_for(r, alpha))
  rank = max(v[2] for v in per_slice.values())
  alpha = per_slice[next(iter(per_slice))][3]
  common = layouts.scale_for(rank, alpha)
  a_out = np.zeros(stack + (target.fan_in, rank), np.float32)
  b_out = np.zeros(stack + (rank, target.fan_out), np.float32)
  for index, (a, b, r, _, scale) in per_slice.items():
    a_out[index][:, :r] = a.T
    b_out[index][:r] = b.T * (scale / common)
  return {"a": a_out, "b": b_out}, rank, alpha


def load_peft(path: str, params, cfg: ModelConfig):
  """A PEFT LoRA adapter directory -> ``(adapters, spec, params)`` for this base model
  (``adapters.load`` reads a llama.cpp one too).

  ``params`` (the base's, any array type) come back with ``modules_to_save`` tensors put
  in (as numpy arrays; every other leaf is the one passed in); ``spec`` carries each
  module's rank and alpha (and rsLoRA) so the forward pass equals PEFT's. Where one
  module's rank or alpha differs between layers (``rank_pattern`` per layer), the factors
  are zero-padded to the largest rank and the scale difference is folded into B: exact
  for the forward pass.
  """
  path = hub.resolve(path, adapter=True)
  config = read_config(path)
  file, stored = _read_tensors(path)
  return from_tensors(file, config, peft_moe.unfuse(file, stored, config, cfg), params, cfg)


def from_tensors(file: str, config: dict, stored: dict, params, cfg: ModelConfig):
  """``load_peft`` of tensors ``stored`` under PEFT's names (read from ``file``) with PEFT
  config fields ``config``."""
  from jlora import models
  modules, names = {}, {}  # HF module -> (entry, index); (jlora path, index) -> HF name
  for entry, index, name in hf.tensor_names(cfg):
    modules[hf.module_name(name)] = entry, index
    names[entry.path, index] = name
  flat_params = lora_lib.flatten(params)  # only shapes are read, and replaced leaves copied
  rank0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
  rslora = bool(config.get("use_rslora", False))
  layouts = models.lora_spec(cfg, rank0, rslora=rslora)  # layouts and scale_for
  factors, full = _sort_tensors(file, stored, modules, flat_params, cfg)
  adapters, rules = {}, []
  for p, slices in sorted(factors.items()):
    shape = tuple(flat_params[p].shape)
    layout = layouts.layout_for(p, shape)
    target = lora_lib.Target(p, shape, layout, 1, alpha0, 1.0)  # fans and stacking
    adapters[p], rank, alpha = _stack(file, p, slices, target, names, config, layouts)
    experts = (cfg.experts_per_token or 1) if "e" in layout else 1
    rules.append(lora_lib.Rule(f"^{re.escape(p)}$", rank=rank * experts, alpha=alpha))
  if not rules:
    raise ValueError(f"{file}: no LoRA factors (lora_A/lora_B) in the adapter")
  spec = models.lora_spec(cfg, rank0, alpha=alpha0, rslora=rslora, targets=tuple(rules),
                          full=tuple(f"^{re.escape(p)}$" for p in sorted(full)))
  params = lora_lib.unflatten({**flat_params, **full})
  adapters = lora_lib.unflatten({f"{p}/{k}": v for p, f in adapters.items() for k, v in f.items()})
  lora_lib.checked_factors(params, adapters, spec)  # every factor fits its kernel
  return adapters, spec, params
