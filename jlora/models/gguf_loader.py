"""GGUF files (llama.cpp): metadata -> ModelConfig, dequantised tensors -> jlora's tree, and
the BPE tokenizer from the embedded vocabulary (via the ``gguf`` and ``tokenizers``
packages)."""

from __future__ import annotations

import functools
import os

import numpy as np

from jlora.core import ggml
from jlora.models.config import ModelConfig

# GGUF tensor name -> HF tensor name (llama.cpp's convert script in reverse).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_ARCH = {"llama": "llama", "qwen3": "qwen3"}


def open_reader(path: str):
  try:
    stat = os.stat(path)
  except OSError as e:
    raise ValueError(f"{path}: cannot read GGUF ({e.strerror})") from None
  return _cached_reader(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
  """Parsing the header and metadata takes seconds (pure Python); the weights, tokenizer
  and chat template of one file are read through one memory-mapped reader."""
  del mtime_ns, size  # cache keys only: a rewritten file is parsed anew
  import gguf
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise ValueError(f"{path}: cannot read GGUF ({e})") from None


def release() -> None:
  """Drop the cached readers. A parsed reader holds every metadata field (the whole
  vocabulary among them) as Python and numpy objects; callers that have read the weights,
  tokenizer and template call this so a training run does not carry it."""
  _cached_reader.cache_clear()


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_config(path: str, reader=None) -> ModelConfig:
  reader = reader or open_reader(path)
  arch = _field(reader, "general.architecture")
  if arch not in _ARCH:
    raise ValueError(f"{path}: unknown GGUF architecture {arch!r}; supported: "
                     f"{', '.join(_ARCH)}")
  g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)
  heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  names = {t.name for t in reader.tensors}
  vocab = g("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
  return ModelConfig(
      model_type=_ARCH[arch], vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(g("feed_forward_length")), num_layers=int(g("block_count")),
      num_heads=heads, num_kv_heads=int(g("attention.head_count_kv", heads)),
      head_dim=int(g("attention.key_length", hidden // heads)),
      rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=float(g("rope.freq_base", 10000.0)),
      tie_embeddings="output.weight" not in names, qk_norm=arch == "qwen3",
      max_position_embeddings=int(g("context_length", 8192)))


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (interleaved RoPE -> HF rotate-half) of ``w``'s
  rows (its first axis; the rest, e.g. a row's blocks and their bytes, move with them)."""
  out, *rest = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's q/k row permutation of a Llama weight's rows (HF rotate-half ->
  interleaved RoPE, its ``convert_hf_to_gguf`` ``LlamaModel.permute``): ``_unpermute``'s
  inverse."""
  out, inp = w.shape
  return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def permuted_heads(hf_name: str, cfg: ModelConfig) -> int | None:
  """The head count whose rows llama.cpp permutes in tensor ``hf_name`` (Llama's q and k
  projections: query heads, KV heads), None for every other tensor and architecture."""
  if cfg.model_type != "llama":
    return None
  if hf_name.endswith("q_proj.weight"):
    return cfg.num_heads
  return cfg.num_kv_heads if hf_name.endswith("k_proj.weight") else None


def hf_name(gguf_name: str) -> str | None:
  """The HF tensor name of a GGUF tensor name (``blk.3.attn_q.weight`` ->
  ``model.layers.3.self_attn.q_proj.weight``); None for tensors jlora computes instead
  (e.g. ``rope_freqs``)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split(".")
  if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
    return None
  return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"


def gguf_name(hf: str) -> str | None:
  """``hf_name``'s inverse; None for a name llama.cpp has no tensor for."""
  for g, h in _GLOBAL_NAMES.items():
    if h == hf:
      return g
  parts = hf.split(".")
  if len(parts) < 5 or parts[:2] != ["model", "layers"]:
    return None
  module = ".".join(parts[3:-1])
  short = {v: k for k, v in _LAYER_NAMES.items()}.get(module)
  return None if short is None else f"blk.{parts[2]}.{short}.{parts[-1]}"


class _Tensors(dict):
  """HF name -> GGUF tensor record; ``[name]`` dequantises that one tensor to f32 in HF's
  layout (read one at a time by the loader: the whole model is never held in f32), or, for
  the names in ``blocks`` that the file quantises, gives its blocks as they are
  (``ggml.Blocks``, rows in HF's order: ``model.quantize = "gguf"``)."""

  def __init__(self, records: dict, cfg: ModelConfig, blocks=frozenset()):
    super().__init__(records)
    self.cfg, self.blocks = cfg, blocks

  def __getitem__(self, name: str):
    import gguf
    t = super().__getitem__(name)
    if name in self.blocks and (kind := ggml.kind(t.tensor_type.name, t.name)) is not None:
      rows = int(np.prod([int(d) for d in t.shape[1:]]))
      data = np.asarray(t.data).reshape(rows, -1, ggml.KINDS[kind][1])
      heads = permuted_heads(name, self.cfg)
      return ggml.Blocks(data if heads is None else _unpermute(data, heads), kind, -1)
    x = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    x = x.reshape(tuple(int(d) for d in reversed(t.shape)))
    heads = permuted_heads(name, self.cfg)
    return x if heads is None else _unpermute(x, heads)

  def items(self):
    return ((name, self[name]) for name in self)

  def values(self):
    return (self[name] for name in self)


def hf_tensors(path: str, cfg: ModelConfig, reader=None, blocks=frozenset()) -> _Tensors:
  """The tensors of a GGUF file by HF name, each dequantised to f32 and laid out as in HF
  when read; those named in ``blocks`` kept in the file's blocks where it quantises them
  (a block type jlora cannot decode: a one-line ValueError naming it, raised here, before
  any tensor is read)."""
  reader = reader or open_reader(path)
  records = {hf_name(t.name): t for t in reader.tensors}
  records.pop(None, None)  # e.g. rope_freqs: computed from the config instead
  for name, t in records.items():  # the file's order: the first offending tensor named
    if name in blocks:
      ggml.kind(t.tensor_type.name, f"{path}: tensor {t.name}")
  return _Tensors(records, cfg, frozenset(blocks))


def tokenizer(path: str, reader=None):
  """The embedded GPT-2-style BPE tokenizer as a ``tokenizers.Tokenizer``."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  reader = reader or open_reader(path)
  if _field(reader, "tokenizer.ggml.model") != "gpt2":
    raise ValueError(f"{path}: only GPT-2-style BPE GGUF tokenizers are supported")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = _field(reader, "tokenizer.ggml.token_type")
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                             ignore_merges=False))
  steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
  if _field(reader, "tokenizer.ggml.pre") in ("smollm", "default"):
    steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
  tok.decoder = decoders.ByteLevel()
  special = [t for t, k in zip(tokens, types) if k == 3]  # CONTROL tokens
  tok.add_special_tokens(special)
  return tok


def chat_template(path: str, reader=None) -> str | None:
  return _field(reader or open_reader(path), "tokenizer.chat_template")
