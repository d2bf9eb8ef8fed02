"""Hugging Face checkpoints: the name table between HF tensors and jlora's tree, and the
safetensors directory loader (single file, many files, or a sharded index)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from jlora.core import ggml
from jlora.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
  """One jlora parameter and the HF tensor(s) it is made of.

  ``hf`` has ``{layer}`` / ``{expert}`` fields when the jlora array stacks layers/experts;
  ``transpose``: HF stores nn.Linear weights [out, in], jlora kernels are [in, out].
  """
  path: str
  hf: str
  transpose: bool = False

  def names(self, cfg: ModelConfig) -> Iterator[tuple[tuple[int, ...], str]]:
    """(index into the stacked array, HF tensor name) for every slice."""
    layers = range(cfg.num_layers) if "{layer}" in self.hf else [None]
    experts = range(cfg.num_experts) if "{expert}" in self.hf else [None]
    for i in layers:
      for e in experts:
        index = tuple(x for x in (i, e) if x is not None)
        yield index, self.hf.format(layer=i, expert=e)


def entries(cfg: ModelConfig) -> list[Entry]:
  """The name table of a model (HF transformers naming)."""
  L = "model.layers.{layer}."
  out = [Entry("embed/embedding", "model.embed_tokens.weight"),
         Entry("norm/scale", "model.norm.weight"),
         Entry("layers/input_norm/scale", L + "input_layernorm.weight"),
         Entry("layers/post_attn_norm/scale", L + "post_attention_layernorm.weight")]
  for p in ("q", "k", "v", "o"):
    out.append(Entry(f"layers/attn/{p}_proj/kernel", L + f"self_attn.{p}_proj.weight", True))
    if cfg.attention_bias:
      out.append(Entry(f"layers/attn/{p}_proj/bias", L + f"self_attn.{p}_proj.bias"))
  if cfg.qk_norm:
    out += [Entry("layers/attn/q_norm/scale", L + "self_attn.q_norm.weight"),
            Entry("layers/attn/k_norm/scale", L + "self_attn.k_norm.weight")]
  for p in ("gate", "up", "down"):
    if cfg.is_moe:
      out.append(Entry(f"layers/moe/{p}_proj/kernel",
                       L + "mlp.experts.{expert}." + f"{p}_proj.weight", True))
    else:
      out.append(Entry(f"layers/mlp/{p}_proj/kernel", L + f"mlp.{p}_proj.weight", True))
  if cfg.is_moe:
    out.append(Entry("layers/moe/router/kernel", L + "mlp.gate.weight", True))
  if not cfg.tie_embeddings:
    out.append(Entry("lm_head/kernel", "lm_head.weight", True))
  return out


def tensor_names(cfg: ModelConfig) -> Iterator[tuple[Entry, tuple[int, ...], str]]:
  """(entry, index into the stacked jlora array, HF tensor name) for every HF tensor."""
  for entry in entries(cfg):
    for index, name in entry.names(cfg):
      yield entry, index, name


def module_name(tensor_name: str) -> str:
  """"model.layers.0.mlp.up_proj.weight" -> "model.layers.0.mlp.up_proj"."""
  return tensor_name.rsplit(".", 1)[0]


def read_json(path: str, name: str, expected: str) -> tuple[dict, str]:
  """(the JSON file ``name`` in directory ``path``, its path); one-line errors when it is
  missing (saying what ``path`` was expected to be) or malformed."""
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    raise ValueError(f"{path}: no {name} (expected {expected})")
  try:
    with open(file) as f:
      return json.load(f), file
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None


def read_config(path: str) -> ModelConfig:
  hf, file = read_json(path, "config.json", "an HF model directory or a .gguf file")
  return ModelConfig.from_hf(hf, file)


def tensor_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file that holds it."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {k: os.path.join(path, v) for k, v in weight_map.items()}
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise ValueError(f"{path}: no *.safetensors weights")
  out = {}
  for name in files:
    file = os.path.join(path, name)
    for key in _open(file).keys():
      out[key] = file
  return out


def _open(file: str):
  try:
    return safe_open(file, framework="numpy")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{file}: cannot read safetensors ({e})") from None


class SafetensorsDir:
  """Tensors of an HF safetensors directory, by HF name."""

  def __init__(self, path: str):
    self.path = path
    self.files = tensor_files(path)
    self.handles: dict[str, object] = {}

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def file(self, name: str) -> str:
    return self.files[name]

  def __getitem__(self, name: str) -> np.ndarray:
    file = self.files[name]
    handle = self.handles.get(file) or self.handles.setdefault(file, _open(file))
    try:
      return handle.get_tensor(name)
    except SafetensorError as e:
      raise ValueError(f"{file}: cannot read tensor '{name}' ({e})") from None


def assemble(tensors, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]],
             source: str) -> dict[str, np.ndarray]:
  """{jlora path: f32 numpy array} from HF-named tensors (a SafetensorsDir or a dict)."""
  return dict(assembled(tensors, cfg, shapes, source))


def _aligned_empty(shape: tuple[int, ...], align: int = 64) -> np.ndarray:
  """An f32 array whose data starts on an ``align``-byte boundary: XLA's CPU client then
  adopts the buffer as the device array instead of copying it (a second host copy of the
  largest parameter group, otherwise, while it is placed)."""
  n = int(np.prod(shape)) * 4
  raw = np.empty(n + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + n].view(np.float32).reshape(shape)


def assembled(tensors, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str):
  """(jlora path, f32 numpy array) one parameter at a time, so a caller can cast or
  quantise each before the next is read (the whole model is never held in f32). Where
  ``tensors`` gives a GGUF's blocks (``ggml.Blocks``: ``model.quantize = "gguf"``) the
  parameter is a ``ggml.Stack`` of them instead.

  Args:
    tensors: supports ``name in tensors`` and ``tensors[name]``.
    shapes: expected shape of every jlora parameter (from the model's abstract init).
    source: what to name in errors (the directory or file).
  """
  for entry in entries(cfg):
    if entry.path not in shapes:
      continue
    array = None  # allocated for the first slice: f32, or a GGUF's blocks (ggml.Stack)
    for index, name in entry.names(cfg):
      if name not in tensors:
        raise ValueError(f"{source}: tensor '{name}' is missing from the checkpoint")
      x = tensors[name]
      file = tensors.file(name) if hasattr(tensors, "file") else source
      want = shapes[entry.path][len(index):]
      want = want[::-1] if entry.transpose else want  # in HF's own [out, in] order
      if x.shape != want:
        raise ValueError(f"{file}: tensor '{name}' has shape {x.shape}, the config "
                         f"implies {want}")
      if array is None:
        array = (ggml.Stack(shapes[entry.path][:len(index)], entry.path)
                 if isinstance(x, ggml.Blocks) else _aligned_empty(shapes[entry.path]))
      elif isinstance(x, ggml.Blocks) != isinstance(array, ggml.Stack):
        raise ValueError(f"{file}: '{entry.hf}' is quantised in some layers and float in "
                         "others (model.quantize='gguf' needs one or the other in all)")
      array[index] = x.T if entry.transpose else x
      del x
    yield entry.path, array
    del array  # before the next one is allocated: one parameter on the host at a time
