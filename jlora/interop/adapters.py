"""Someone else's LoRA adapter, whatever its format: ``load`` reads a PEFT adapter
directory (or Hub id) with ``peft.load_peft`` and a llama.cpp adapter (a ``.gguf`` file)
with ``gguf_adapter.read`` through the same PEFT reader (``lora.init``, ``jlora
import-peft``)."""

from __future__ import annotations

from jlora.interop import gguf_adapter, peft
from jlora.models.config import ModelConfig


def load(path: str, params, cfg: ModelConfig):
  """``(adapters, spec, params)`` of the adapter at ``path`` for this base model
  (``peft.load_peft``'s contract)."""
  if path.endswith(".gguf"):
    return peft.from_tensors(*gguf_adapter.read(path, cfg), params, cfg)
  return peft.load_peft(path, params, cfg)


def check(path: str) -> None:
  """What preflight reads of ``lora.init`` before anything loads: the adapter's config
  (PEFT) or header (llama.cpp), one line if it is not a LoRA adapter jlora reads."""
  if path.endswith(".gguf"):
    gguf_adapter.header(path)
  else:
    peft.read_config(path)
