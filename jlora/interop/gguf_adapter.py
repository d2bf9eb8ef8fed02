"""llama.cpp LoRA adapters (GGUF), out and in: what ``llama-cli --lora`` / ollama ``ADAPTER``
load, in the layout of llama.cpp's ``convert_lora_to_gguf.py``.

The file: ``general.architecture`` (``llama`` / ``qwen3``), ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``, and per adapted weight two tensors named
after the base's GGUF tensor: ``blk.N.attn_q.weight.lora_a`` ([in] x r: numpy [r, in],
PEFT's ``lora_A``) and ``.lora_b`` ([r] x out: numpy [out, r], PEFT's ``lora_B``). llama.cpp
applies ``W x + (alpha / r) B A x`` with r each tensor's own rank (``llama-adapter.cpp``;
alpha 0 means a scale of 1). Llama's q and k weights are stored with llama.cpp's row
permutation (interleaved RoPE), so their ``lora_b`` rows are permuted the same way; Qwen3's
are not (NeoX RoPE).

Written from the PEFT tensors (``peft.peft_tensors``: one name table, one orientation):
each module's PEFT scale becomes ``alpha / r`` with one alpha for the file (the first
module's scale x rank), any other module's difference folded into its ``lora_b`` (exact).
Read back (``adapters.load``) through ``peft.from_tensors``: the tensors renamed to
PEFT's, Llama's q/k rows un-permuted, and PEFT's rank-from-shape and alpha rules give
llama.cpp's scale.
"""

from __future__ import annotations

import re

import numpy as np

from jlora.infra import fs
from jlora.interop import peft
from jlora.models import gguf_loader
from jlora.models.config import ModelConfig

ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3"}  # jlora model_type -> llama.cpp's
DTYPES = {"f32": np.float32, "f16": np.float16}
_FACTOR = re.compile(r"(.+)\.lora_([AB])\.weight")


def tensors(adapters, spec, cfg: ModelConfig, dtype: str = "f32"
            ) -> tuple[dict[str, np.ndarray], float]:
  """(GGUF tensor name -> array, the file's ``adapter.lora.alpha``) of jlora adapters."""
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)} for a GGUF adapter")
  if cfg.model_type not in ARCHITECTURES:
    raise ValueError(f"--format gguf: llama.cpp adapters are written for "
                     f"{', '.join(ARCHITECTURES)} models, not {cfg.model_type}")
  stored, config = peft.peft_tensors(adapters, spec, cfg)
  factors: dict[str, dict[str, np.ndarray]] = {}
  for key, value in stored.items():
    module, which = _FACTOR.fullmatch(key[len(peft.PREFIX):]).groups()
    factors.setdefault(module, {})[which] = value
  alpha, out = None, {}
  for module, f in sorted(factors.items()):
    name = gguf_loader.gguf_name(f"{module}.weight")
    if name is None:
      raise ValueError(f"--format gguf: llama.cpp has no tensor for {module}")
    a, b = f["A"], f["B"]
    rank = a.shape[0]
    scale = peft.module_scale(config, module, rank)
    alpha = scale * rank if alpha is None else alpha
    b = b * np.float32(scale * rank / alpha)  # 1 where the module's alpha is the file's
    heads = gguf_loader.permuted_heads(f"{module}.weight", cfg)
    if heads is not None:
      b = gguf_loader.permute(b, heads)
    out[f"{name}.lora_a"] = np.ascontiguousarray(a, DTYPES[dtype])
    out[f"{name}.lora_b"] = np.ascontiguousarray(b, DTYPES[dtype])
  return out, float(alpha)


def save(out: str, adapters, spec, cfg: ModelConfig, dtype: str = "f32") -> str:
  """Write the llama.cpp LoRA adapter file ``out`` (``tensors``; must not exist)."""
  import gguf
  arrays, alpha = tensors(adapters, spec, cfg, dtype)
  with fs.staging_file(out) as tmp:
    writer = gguf.GGUFWriter(tmp, ARCHITECTURES[cfg.model_type])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, x in arrays.items():
      writer.add_tensor(name, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
  return out


def header(path: str):
  """(reader, architecture, alpha) of a llama.cpp LoRA adapter file; a file that is not
  one is one line."""
  reader = gguf_loader.open_reader(path)
  field = lambda key: gguf_loader._field(reader, key)  # noqa: E731
  if field("general.type") != "adapter" or field("adapter.type") != "lora":
    raise ValueError(f"{path}: not a llama.cpp LoRA adapter (general.type "
                     f"{field('general.type')!r}, adapter.type {field('adapter.type')!r})")
  return reader, field("general.architecture"), float(field("adapter.lora.alpha") or 0.0)


def read(path: str, cfg: ModelConfig) -> tuple[str, dict, dict]:
  """A llama.cpp LoRA adapter as ``(file, PEFT config fields, PEFT-named tensors)`` for
  ``peft.from_tensors``; a file that is not one, or is for another architecture, is one
  line."""
  reader, arch, alpha = header(path)
  if arch != ARCHITECTURES.get(cfg.model_type):
    raise ValueError(f"{path}: an adapter for {arch!r} models; the base is a "
                     f"{cfg.model_type} model")
  stored, ranks = {}, {}
  for t in reader.tensors:
    base, _, which = t.name.rpartition(".")
    hf = gguf_loader.hf_name(base)
    if which not in ("lora_a", "lora_b") or hf is None:
      raise ValueError(f"{path}: tensor '{t.name}' is not a LoRA factor of a {arch} weight")
    module = hf[:-len(".weight")]
    x = np.array(t.data, np.float32).reshape([int(d) for d in reversed(t.shape)])
    heads = gguf_loader.permuted_heads(hf, cfg)
    if which == "lora_a":
      ranks[module] = x.shape[0]
    elif heads is not None:
      x = gguf_loader._unpermute(x, heads)
    stored[f"{peft.PREFIX}{module}.lora_{which[-1].upper()}.weight"] = x
  if not stored:
    raise ValueError(f"{path}: no LoRA tensors")
  # llama.cpp's scale alpha / r per tensor is PEFT's with each module's rank from its
  # shape; alpha 0 means a scale of 1: each module's alpha its own rank
  config = {"r": max(ranks.values()), "lora_alpha": alpha or 1.0, "use_rslora": False}
  if not alpha:
    config["alpha_pattern"] = {re.escape(m): r for m, r in ranks.items()}
  return path, config, stored
