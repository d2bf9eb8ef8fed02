"""Shared test helpers."""

import json
import os

import jax
import jax.numpy as jnp
import tokenizers
from tokenizers import decoders, models as tok_models, pre_tokenizers

from jlora import data


def randomize_b(adapters, key, scale=0.1):
  """Adapters with a random non-zero B (B = 0 at init hides bugs in the LoRA path)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    is_b = getattr(path[-1], "key", None) == "b"
    out.append(scale * jax.random.normal(k, leaf.shape, leaf.dtype) if is_b else leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def max_abs_diff(x, y):
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))


CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(chat_template=CHAT) -> data.Tokenizer:
  """One token per byte (ids 0..255) plus three special tokens: tiny, exact offsets."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = tokenizers.Tokenizer(tok_models.BPE({c: i for i, c in enumerate(alphabet)}, []))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<eos>", "<|im_start|>", "<|im_end|>"])
  return data.Tokenizer(tok, eos_id=tok.token_to_id("<eos>"), chat_template=chat_template)


def tiny_model_dir(out_dir: str, kind: str = "llama", **overrides) -> str:
  """A tiny random HF checkpoint (transformers) with the byte tokenizer and a chat template
  beside it: a complete model directory for trainer tests."""
  from tests.hf_models import save_tiny
  path = save_tiny(kind, out_dir, **{"vocab_size": 320, **overrides})
  tok = byte_tokenizer()
  tok.tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<eos>", "chat_template": CHAT}, f)
  return path
