"""Sampling with the KV cache: one jitted prefill + ``lax.fori_loop`` decode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jlora.lora import with_adapters
from jlora.models.transformer import Transformer, init_cache


def _pick(logits_BV, temperature, key):
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature"))
def _generate(model: Transformer, params, tokens_BP, prompt_mask_BP, key, *,
              max_new_tokens: int, temperature: float):
  B, P = tokens_BP.shape
  cache = init_cache(model.cfg, B, P + max_new_tokens, model.dtype)
  cache["valid"] = cache["valid"].at[:, :P].set(prompt_mask_BP)
  positions = jnp.maximum(jnp.cumsum(prompt_mask_BP, axis=1) - 1, 0)  # left padding
  logits, cache = model.apply({"params": params}, tokens_BP, positions, None, cache)
  key, sub = jax.random.split(key)
  first = _pick(logits[:, -1], temperature, sub)
  out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)

  def body(i, carry):
    out, cache, position, key = carry
    key, sub = jax.random.split(key)
    last = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
    logits, cache = model.apply({"params": params}, last, position[:, None],
                                None, cache)
    out = out.at[:, i].set(_pick(logits[:, -1], temperature, sub))
    return out, cache, position + 1, key

  out, *_ = jax.lax.fori_loop(1, max_new_tokens, body, (out, cache, positions[:, -1] + 1, key))
  return out


def generate(model: Transformer, params, tokens_BP, *, max_new_tokens: int,
             temperature: float = 0.0, rng: jax.Array | None = None,
             prompt_mask_BP=None, adapters=None, spec=None) -> jax.Array:
  """Continue each prompt by ``max_new_tokens`` tokens.

  Args:
    model, params: from ``jlora.models.load`` (or any Transformer and its params).
    tokens_BP: int prompts, left-padded to a common length P.
    max_new_tokens: tokens to sample per prompt.
    temperature: 0 for greedy, else softmax sampling at this temperature.
    rng: PRNG key for sampling (required when temperature > 0).
    prompt_mask_BP: 1 for real prompt tokens, 0 for left padding (default: all real).
    adapters, spec: sample from base + LoRA adapters.
  Returns:
    [B, max_new_tokens] sampled token ids.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs rng")
  tokens_BP = jnp.asarray(tokens_BP, jnp.int32)
  mask = (jnp.ones_like(tokens_BP, bool) if prompt_mask_BP is None
          else jnp.asarray(prompt_mask_BP, bool))
  if adapters is not None:
    params = with_adapters(params, adapters, spec)
  key = rng if rng is not None else jax.random.PRNGKey(0)
  return _generate(model, params, tokens_BP, mask, key, max_new_tokens=max_new_tokens,
                   temperature=float(temperature))
