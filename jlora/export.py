"""Interoperability with Hugging Face: PEFT LoRA adapters out and in, and merged checkpoints.

- ``save_peft``: jlora adapters -> ``adapter_model.safetensors`` + ``adapter_config.json``
  (HF module names, ``lora_A`` [r, in] / ``lora_B`` [out, r], per-module rank/alpha in
  ``rank_pattern``/``alpha_pattern``, fully trained modules as ``modules_to_save``; MoE
  experts under the per-expert 2-D names serving engines load).
- ``load_peft``: a PEFT LoRA adapter -> (adapters, spec, params) for jlora: evaluate it, or
  continue training from it (``lora.init`` in a run config).
- ``merge``: base + adapters merged in f32, written as an HF model directory (config.json,
  sharded safetensors, tokenizer files) in the base's dtype.

The name table is ``jlora.models.hf.entries`` (the same one the checkpoint loader reads),
so export, import and loading can never disagree about a tensor's name or orientation.
Everything is written to a temporary directory beside ``out`` and moved into place only
when complete: a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jlora import lora as lora_lib
from jlora.models import hf
from jlora.models.config import ModelConfig

PREFIX = "base_model.model."
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
# PEFT options whose adapters do not compute W + s B A on nn.Linear weights.
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "use_qalora": "QALoRA",
               "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern",
               "target_parameters": "3-D expert parameters (target_parameters)",
               "trainable_token_indices": "trainable tokens", "megatron_config": "Megatron",
               "alora_invocation_tokens": "aLoRA"}
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


# ----------------------------------------------------------------------------- names

def _modules(cfg: ModelConfig) -> Iterator[tuple[hf.Entry, tuple[int, ...], str]]:
  """(entry, index into the stacked jlora array, HF tensor name) for every HF tensor."""
  for entry in hf.entries(cfg):
    for index, name in entry.names(cfg):
      yield entry, index, name


def _module_name(tensor_name: str) -> str:
  return tensor_name.rsplit(".", 1)[0]  # "model.layers.0.mlp.up_proj.weight" -> module


def _short(module: str) -> str:
  return module.rsplit(".", 1)[-1]


def _abstract_params(cfg: ModelConfig) -> dict:
  from flax import linen as nn
  from jlora import models
  return nn.unbox(models.abstract_params(models.Transformer(cfg)))


@contextlib.contextmanager
def _staging(out: str) -> Iterator[str]:
  """A temporary directory beside ``out``, renamed to ``out`` only if the block succeeds."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f"output {out} already exists and is not an empty directory")
  parent = os.path.dirname(out)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
  except OSError as e:
    raise ValueError(f"cannot write to {parent}: {e.strerror}") from None
  try:
    yield tmp
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- export

def peft_tensors(adapters, spec: lora_lib.LoraSpec, cfg: ModelConfig, full: dict | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(safetensors dict, adapter_config fields) of jlora adapters in PEFT's format.

  Args:
    adapters: jlora adapter tree (``{kernel path: {"a", "b"}}``, stacked over layers).
    spec: the LoraSpec they were made with.
    cfg: the base model's config (names and stacking).
    full: ``{jlora path: array}`` of fully trained parameters (``modules_to_save``).
  """
  targets = lora_lib.resolve(_abstract_params(cfg), spec)
  by_path: dict[str, list] = {}
  for entry, index, name in _modules(cfg):
    by_path.setdefault(entry.path, []).append((entry, index, name))
  tensors, ranks, alphas, short_names = {}, {}, {}, set()
  for path, f in lora_lib.adapter_leaves(adapters).items():
    t = targets.get(path)
    if t is None or path not in by_path or not by_path[path][0][0].transpose:
      raise ValueError(f"adapter on '{path}' has no Hugging Face module to export to")
    a, b = np.asarray(f["a"], np.float32), np.asarray(f["b"], np.float32)
    for _, index, name in by_path[path]:
      module = _module_name(name)
      tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a[index].T)
      tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[index].T)
    # One pattern per jlora path, matching its module in every layer (and expert).
    pattern = re.escape(_module_name(by_path[path][0][0].hf)).replace(
        re.escape("{layer}"), r"\d+").replace(re.escape("{expert}"), r"\d+")
    ranks[pattern], alphas[pattern] = t.rank, t.alpha
    short_names.add(_short(_module_name(by_path[path][0][2])))
  if not tensors:
    raise ValueError("no adapters to export (a full fine-tuning run: use `jlora merge`)")
  modules_to_save = []
  for path, value in (full or {}).items():
    if path not in by_path:
      raise ValueError(f"fully trained parameter '{path}' has no Hugging Face name")
    value = np.asarray(value, np.float32)
    for entry, index, name in by_path[path]:
      tensors[PREFIX + name] = np.ascontiguousarray(value[index].T if entry.transpose
                                                    else value[index])
      if _module_name(name) not in modules_to_save:
        modules_to_save.append(_module_name(name))
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
      "lora_alpha": spec.alpha, "target_modules": sorted(short_names),
      "rank_pattern": {k: v for k, v in ranks.items() if v != spec.rank},
      "alpha_pattern": {k: v for k, v in alphas.items() if v != spec.alpha},
      "use_rslora": spec.rslora, "bias": "none", "lora_dropout": 0.0,
      "fan_in_fan_out": False, "modules_to_save": modules_to_save or None,
      "inference_mode": True}
  return tensors, config


def save_peft(out: str, adapters, spec: lora_lib.LoraSpec, cfg: ModelConfig, *,
              full: dict | None = None, base_model: str | None = None) -> str:
  """Write a PEFT adapter directory at ``out`` (must not exist, or be empty)."""
  tensors, config = peft_tensors(adapters, spec, cfg, full)
  config["base_model_name_or_path"] = base_model
  with _staging(out) as tmp:
    save_file(tensors, os.path.join(tmp, ADAPTER_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2)
  return out


# ----------------------------------------------------------------------------- import

def _read_peft_config(path: str) -> dict:
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


def _pattern_value(patterns: dict, module: str, default):
  """PEFT's rule (``peft.utils.other.get_pattern_key``): the first key that matches the
  end of the module name, else the default."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def load_peft(path: str, params, cfg: ModelConfig):
  """A PEFT LoRA adapter directory -> ``(adapters, spec, params)`` for this base model.

  ``params`` (the base's, any array type) come back with ``modules_to_save`` tensors put
  in (as numpy arrays; every other leaf is the one passed in); ``spec`` carries each
  module's rank and alpha (and rsLoRA) so the forward pass equals PEFT's. Where one
  module's rank or alpha differs between layers (``rank_pattern`` per layer), the factors
  are zero-padded to the largest rank and the scale difference is folded into B: exact
  for the forward pass.
  """
  config = _read_peft_config(path)
  file = os.path.join(path, ADAPTER_FILE)
  if not os.path.isfile(file):
    raise ValueError(f"{path}: no {ADAPTER_FILE}")
  try:
    handle = safe_open(file, framework="numpy")
    stored = {k: handle.get_tensor(k) for k in handle.keys()}
  except Exception as e:  # safetensors raises its own error types for a damaged file
    raise ValueError(f"{file}: cannot read safetensors ({e})") from None
  modules, names = {}, {}  # HF module -> (entry, index); (jlora path, index) -> HF name
  for entry, index, name in _modules(cfg):
    modules[_module_name(name)] = entry, index
    names[entry.path, index] = name
  flat_params = lora_lib.flatten(params)  # only shapes are read, and replaced leaves copied
  rank0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
  rslora = bool(config.get("use_rslora", False))
  from jlora import models
  layouts = models.lora_spec(cfg, rank0, rslora=rslora)  # layouts and scale_for
  factors: dict[str, dict[tuple, dict]] = {}  # jlora path -> index -> {"A"/"B": (key, x)}
  full: dict[str, np.ndarray] = {}
  for key, value in stored.items():
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", name)
    if m is None:  # a modules_to_save tensor: the whole trained weight
      module = _module_name(name)
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
  adapters, rules = {}, []
  for path, slices in sorted(factors.items()):
    shape = tuple(flat_params[path].shape)
    layout = layouts.layout_for(path, shape)
    fans = lora_lib.Target(path, shape, layout, 1, alpha0, 1.0)
    fan_in, fan_out = fans.fan_in, fans.fan_out
    stack = tuple(d for d, c in zip(shape, layout) if c in "be")  # layers (and experts)
    per_slice = {}
    for index in np.ndindex(*stack):
      name = names[(path, index)]
      module = _module_name(name)
      got = slices.get(index, {})
      for which in "AB":
        if which not in got:
          raise ValueError(f"{file}: '{PREFIX}{module}.lora_{which}.weight' is missing "
                           f"(the adapter covers {path.split('/')[-2]} in some layers only)")
      (ka, a), (kb, b) = got["A"], got["B"]
      r = a.shape[0]
      if a.shape != (r, fan_in):
        raise ValueError(f"{file}: tensor '{ka}' has shape {a.shape}; the base model's "
                         f"'{name}' takes {fan_in} inputs (expected ({r}, {fan_in}))")
      if b.shape != (fan_out, r):
        raise ValueError(f"{file}: tensor '{kb}' has shape {b.shape}; expected "
                         f"({fan_out}, {r}) for the base model's '{name}'")
      alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha0))
      per_slice[index] = (a, b, r, alpha, layouts.scale_for(r, alpha))
    rank = max(v[2] for v in per_slice.values())
    alpha = per_slice[next(iter(per_slice))][3]
    common = layouts.scale_for(rank, alpha)
    a_out = np.zeros(stack + (fan_in, rank), np.float32)
    b_out = np.zeros(stack + (rank, fan_out), np.float32)
    for index, (a, b, r, _, scale) in per_slice.items():
      a_out[index][:, :r] = a.T
      b_out[index][:r] = b.T * (scale / common)  # exact: s_i B_i A_i = common (B_i') A_i
    adapters[path] = {"a": a_out, "b": b_out}
    experts = (cfg.experts_per_token or 1) if "e" in layout else 1
    rules.append(lora_lib.Rule(f"^{re.escape(path)}$", rank=rank * experts, alpha=alpha))
  if not rules:
    raise ValueError(f"{file}: no LoRA factors (lora_A/lora_B) in the adapter")
  spec = models.lora_spec(cfg, rank0, alpha=alpha0, rslora=rslora, targets=tuple(rules),
                          full=tuple(f"^{re.escape(p)}$" for p in sorted(full)))
  params = lora_lib.unflatten({**flat_params, **full})
  adapters = lora_lib.unflatten({f"{p}/{k}": v for p, f in adapters.items() for k, v in f.items()})
  lora_lib.checked_factors(params, adapters, spec)  # every factor fits its kernel
  return adapters, spec, params


# ----------------------------------------------------------------------------- merge

def hf_tensors(params, cfg: ModelConfig, dtype) -> dict[str, np.ndarray]:
  """jlora parameters -> {HF tensor name: array in ``dtype``} (inverse of the loader)."""
  flat = {p: np.asarray(x, np.float32) for p, x in lora_lib.flatten(params).items()}
  out = {}
  for entry, index, name in _modules(cfg):
    x = flat[entry.path][index]
    out[name] = np.ascontiguousarray((x.T if entry.transpose else x).astype(dtype))
  return out


def _parse_size(text: str | int) -> int:
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(text).upper())
  if m is None:
    raise ValueError(f"max shard size {text!r}: expected e.g. 5GB, 500MB or a byte count")
  return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def write_safetensors_dir(out_dir: str, tensors: dict[str, np.ndarray],
                          max_shard_bytes: int) -> None:
  """HF's layout: one ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards
  with a ``model.safetensors.index.json`` weight map when larger than a shard. (Written
  here rather than with huggingface_hub's splitter: that is not a dependency of jlora, and
  the layout is three lines of bookkeeping.)"""
  shards, current, size = [], {}, 0
  for name, x in tensors.items():
    if current and size + x.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name], size = x, size + x.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for k, shard in enumerate(shards, 1):
    file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in shard})
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
               "weight_map": weight_map}, f, indent=2)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "tokenizer.model")


def base_dtype(path: str):
  """The dtype the base checkpoint stores its weights in (a quantised GGUF: bfloat16)."""
  if path.endswith(".gguf"):
    from jlora.models import gguf_loader
    kinds = {t.tensor_type.name for t in gguf_loader._reader(path).tensors
             if t.name.endswith("attn_q.weight")}
    return DTYPES.get(next(iter(kinds), ""), ml_dtypes.bfloat16)
  files = hf._tensor_files(path)
  name = next((n for n in files if n.endswith("q_proj.weight")), next(iter(files)))
  with safe_open(files[name], framework="numpy") as handle:
    return DTYPES.get(handle.get_slice(name).get_dtype(), np.float32)


def _write_model_files(tmp: str, base_path: str, cfg: ModelConfig, tok, dtype) -> None:
  """config.json (with the saved dtype) and the tokenizer files beside the weights."""
  dtype_name = np.dtype(dtype).name  # float32 / float16 / bfloat16, as HF spells them
  if base_path.endswith(".gguf"):
    config = cfg.to_hf()
    tok.tok.save(os.path.join(tmp, "tokenizer.json"))
    vocab = lambda i: None if i is None else tok.tok.id_to_token(i)
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": vocab(tok.eos_id),
                 "bos_token": vocab(tok.bos_id), "add_bos_token": tok.add_bos,
                 "chat_template": tok.chat_template}, f, indent=2)
  else:
    with open(os.path.join(base_path, "config.json")) as f:
      config = json.load(f)
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(base_path, name)):
        shutil.copy(os.path.join(base_path, name), tmp)
  config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def save_merged(out: str, params, adapters, spec: lora_lib.LoraSpec | None, cfg: ModelConfig,
                base_path: str, tok, *, dtype=None, max_shard_size: str | int = "5GB") -> str:
  """Base + adapters merged (``W + s A B`` in f32) and written as an HF model directory
  in ``dtype`` (default: the base checkpoint's)."""
  max_bytes = _parse_size(max_shard_size)
  dtype = base_dtype(base_path) if dtype is None else dtype
  merged = lora_lib.merge(params, adapters, spec) if spec is not None and adapters else params
  tensors = hf_tensors(merged, cfg, dtype)
  with _staging(out) as tmp:
    write_safetensors_dir(tmp, tensors, max_bytes)
    _write_model_files(tmp, base_path, cfg, tok, dtype)
  return out


# ----------------------------------------------------------------------------- run dirs

def _run(run_dir: str, step: int | None):
  from jlora import config as config_lib, optim, trainer
  s, trainable = trainer.load_trained(run_dir, step)
  params = optim.combine(trainable["full"], s.frozen)
  return s, trainable, params, config_lib.model_path(s.cfg)


def export_run(run_dir: str, out: str, step: int | None = None) -> str:
  """``jlora export RUN_DIR --format peft --out DIR``."""
  s, trainable, _, base = _run(run_dir, step)
  if s.cfg.train.method == "full":
    raise ValueError(f"{run_dir} is a full fine-tuning run: it has no adapters to export "
                     "(use `jlora merge`)")
  full = lora_lib.flatten(trainable["full"]) if trainable["full"] else None
  return save_peft(out, trainable["lora"], s.spec, s.model_cfg, full=full,
                   base_model=os.path.abspath(base))


def merge_run(run_dir: str, out: str, step: int | None = None,
              max_shard_size: str | int = "5GB") -> str:
  """``jlora merge RUN_DIR --out DIR``."""
  s, trainable, params, base = _run(run_dir, step)
  return save_merged(out, params, trainable["lora"], s.spec if trainable["lora"] else None,
                     s.model_cfg, base, s.tok, max_shard_size=max_shard_size)
