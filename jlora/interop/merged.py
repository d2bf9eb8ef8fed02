"""Merged checkpoints: base + adapters merged (``W + s A B`` in f32) and written as a
Hugging Face model directory (config.json, sharded safetensors, tokenizer files) in the
base's dtype, loadable by ``transformers.AutoModelForCausalLM``. Names and orientations
come from ``jlora.models.hf.entries``, the table the loader reads."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jlora.core import lora as lora_lib, quant
from jlora.infra import fs
from jlora.models import hf
from jlora.models.config import ModelConfig

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def hf_tensors(params, cfg: ModelConfig, dtype) -> dict[str, np.ndarray]:
  """jlora parameters -> {HF tensor name: array in ``dtype``} (inverse of the loader)."""
  flat = {p: np.asarray(x, np.float32) for p, x in lora_lib.flatten(params).items()}
  out = {}
  for entry, index, name in hf.tensor_names(cfg):
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


NAMES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def base_dtype(path: str):
  """The dtype the base checkpoint stores its weights in: what ``jlora merge`` writes by
  default. A quantised GGUF has no such dtype: float32, the merge that reproduces the
  trained run (bfloat16 rounds every merged weight; README, bench/hub_interop.py)."""
  if path.endswith(".gguf"):
    from jlora.models import gguf_loader
    kinds = {t.tensor_type.name for t in gguf_loader.open_reader(path).tensors
             if t.name.endswith("attn_q.weight")}
    return DTYPES.get(next(iter(kinds), ""), np.float32)
  files = hf.tensor_files(path)
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
  in ``dtype`` (default: the base checkpoint's). A quantised base (QLoRA) is dequantised
  first: the adapters were trained against the dequantised weights, so that is the model
  they merge into."""
  max_bytes = _parse_size(max_shard_size)
  dtype = base_dtype(base_path) if dtype is None else dtype
  params = quant.dequantize_tree(params, jnp.float32)
  merged = lora_lib.merge(params, adapters, spec) if spec is not None and adapters else params
  tensors = hf_tensors(merged, cfg, dtype)
  with fs.staging(out) as tmp:
    write_safetensors_dir(tmp, tensors, max_bytes)
    _write_model_files(tmp, base_path, cfg, tok, dtype)
  return out
