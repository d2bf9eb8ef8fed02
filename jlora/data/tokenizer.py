"""A model's tokenizer with what encoding needs besides the vocabulary: BOS/EOS ids and the
chat template, read from the same place as the weights (GGUF metadata or an HF directory's
tokenizer_config.json)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tokenizers


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  tok: tokenizers.Tokenizer
  eos_id: int | None = None
  bos_id: int | None = None
  add_bos: bool = False
  chat_template: str | None = None

  @classmethod
  def from_model(cls, path: str) -> "Tokenizer":
    """From a .gguf file or an HF model directory (tokenizer.json + tokenizer_config.json)."""
    from jlora import models
    path = models.resolve(path)
    if not os.path.exists(path):
      raise ValueError(f"{path}: no such model file or directory")
    tok = models.load_tokenizer(path)
    if path.endswith(".gguf"):
      from jlora.models import gguf_loader
      reader = gguf_loader.open_reader(path)
      field = lambda k: gguf_loader._field(reader, k)  # noqa: E731
      return cls(tok, field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.bos_token_id"),
                 bool(field("tokenizer.ggml.add_bos_token")), field("tokenizer.chat_template"))
    return cls._from_hf_dir(tok, path)

  @classmethod
  def _from_hf_dir(cls, tok: tokenizers.Tokenizer, path: str) -> "Tokenizer":
    config = {}
    file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(file):
      with open(file) as f:
        config = json.load(f)
    template = config.get("chat_template")
    jinja = os.path.join(path, "chat_template.jinja")  # transformers >= 4.43 writes it apart
    if template is None and os.path.isfile(jinja):
      with open(jinja) as f:
        template = f.read()

    def token_id(key):
      value = config.get(key)
      if isinstance(value, dict):  # {"content": "<s>", ...} in older files
        value = value.get("content")
      return None if value is None else tok.token_to_id(value)

    return cls(tok, token_id("eos_token"), token_id("bos_token"),
               bool(config.get("add_bos_token", False)), template)

  def encode(self, text: str, *, offsets: bool = False):
    """Token ids (and ``[n, 2]`` char offsets) of ``text``; no BOS/EOS added."""
    enc = self.tok.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    return (ids, np.asarray(enc.offsets, np.int64).reshape(-1, 2)) if offsets else ids

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size()
