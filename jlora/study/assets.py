"""What a study needs besides its definition: the tiny model of the ``smoke`` budget (and
the capacity study's), and a real text corpus split into training and held-out files.

The tiny model is a random Llama written as an HF model directory by jlora itself
(``merged.hf_tensors`` and ``write_safetensors_dir``: the loader's own table, read back
by ``models.load``), so a smoke study needs neither torch nor a download. Its tokenizer is
byte-level (``tokenizers``' ByteLevel BPE with no merges: 256 byte tokens and ``<eos>``)
unless a word list is given (the capacity study's one-token-per-word vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import numpy as np
from flax import linen as nn

from jlora.infra import fs
from jlora.models.config import ModelConfig

EOS = "<eos>"


def _tokenizer(words: list[str] | None):
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  if words is None:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
  else:
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", EOS] + words))}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens([EOS])
  return tok


def tiny_model(out: str, *, hidden: int = 64, layers: int = 2, heads: int = 4,
               words: list[str] | None = None, seed: int = 0) -> str:
  """A random Llama (``hidden`` wide, ``layers`` deep, FFN 2x) at ``out``: config.json,
  model.safetensors, tokenizer files. Written once (atomically); returns ``out``."""
  if os.path.isfile(os.path.join(out, "config.json")):
    return out
  from jlora.interop import merged
  from jlora.models import Transformer
  tok = _tokenizer(words)
  cfg = ModelConfig(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=hidden,
                    intermediate_size=2 * hidden, num_layers=layers, num_heads=heads,
                    num_kv_heads=heads, head_dim=hidden // heads, max_position_embeddings=512)
  params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(seed),
                                          np.zeros((1, 1), np.int32)))["params"]
  with fs.staging(out) as tmp:
    merged.write_safetensors_dir(tmp, merged.hf_tensors(params, cfg, np.float32), 2**31)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump({**cfg.to_hf(), "torch_dtype": "float32"}, f, indent=2)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
      json.dump({"eos_token": EOS}, f)
  return out


def cache_dir() -> str:
  """Where fetched corpora are kept between studies: $JLORA_CACHE or ~/.cache/jlora."""
  return os.environ.get("JLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "jlora")


def text_split(corpus: str, out: str, held_out: float = 0.05) -> tuple[str, str]:
  """A Debian text corpus (``jlora.data.debian``, fetched once into ``cache_dir()``) as
  ``out/train.jsonl`` and ``out/heldout.jsonl`` ({"text": ...} per document). A document
  goes to held-out by a hash of its text, so the split does not depend on the order or
  number of files. Returns the two paths (written once)."""
  from jlora.data import debian, sources
  train, test = os.path.join(out, "train.jsonl"), os.path.join(out, "heldout.jsonl")
  if os.path.isfile(train) and os.path.isfile(test):
    return train, test
  directory = os.path.join(cache_dir(), "corpora", corpus)
  if not os.path.isdir(directory):
    with fs.staging(directory) as tmp:  # a fetch cut short leaves no corpus behind
      fetched = debian.fetch(corpus, os.path.join(tmp, ".fetch"))
      for name in os.listdir(fetched):
        os.replace(os.path.join(fetched, name), os.path.join(tmp, name))
      shutil.rmtree(os.path.join(tmp, ".fetch"))
  docs = sources.open_source(directory, separator=debian.separator(corpus))
  split = {train: [], test: []}
  for i in range(len(docs)):
    text = docs[i]["text"].strip()
    if text:
      bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32
      split[test if bucket < held_out else train].append(text)
  os.makedirs(out, exist_ok=True)
  for path, texts in split.items():
    fs.write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
  return train, test
