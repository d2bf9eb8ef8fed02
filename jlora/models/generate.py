"""Sampling with the KV cache: one jitted prefill + a ``lax.while_loop`` decode.

``sample`` is the engine (RL's rollouts and ``generate`` both use it): temperature and
top-p, per-token log-probs of the sampled tokens recorded as it goes, and a stop when every
row has produced EOS (checked on device: no host sync per token). It is jitted once per
(batch, prompt width, max_new_tokens) shape; callers that see prompts of many lengths pad
them to a few widths (``bucket``) so they reuse a handful of programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp

from jlora.core import matmul, stack
from jlora.core.lora import with_adapters
from jlora.models.transformer import Transformer, init_cache


@dataclasses.dataclass(frozen=True)
class Samples:
  """``tokens`` [B, N] (after a row's EOS: ``pad``), ``logprobs`` [B, N] f32 log-probs of
  each sampled token under the policy at temperature 1 (0 after EOS), ``lengths`` [B]
  tokens up to and including EOS (N when a row never stopped)."""
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array


jax.tree_util.register_dataclass(Samples, data_fields=["tokens", "logprobs", "lengths"],
                                 meta_fields=[])


def bucket(width: int, multiple: int = 16) -> int:
  """The padded prompt width for a prompt of ``width`` tokens: the next multiple."""
  return -(-width // multiple) * multiple


def _pick(logits_BV, temperature: float, top_p: float, keys_B):
  """(token, its log-prob under softmax(logits)) per row: greedy at temperature 0, else
  softmax sampling at ``temperature`` over the smallest set of tokens whose probability
  reaches ``top_p`` (nucleus sampling; the most likely token is always kept), row b with
  its own key ``keys_B[b]``."""
  logits_BV = logits_BV.astype(jnp.float32)
  logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  if temperature == 0.0:
    token = jnp.argmax(logits_BV, axis=-1)
  else:
    scaled = logits_BV / temperature
    if top_p < 1.0:
      desc = jnp.sort(scaled, axis=-1)[:, ::-1]
      probs = jax.nn.softmax(desc, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
      kept = jnp.sum(before < top_p, axis=-1)  # >= 1
      threshold = jnp.take_along_axis(desc, kept[:, None] - 1, axis=-1)
      scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    token = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys_B, scaled)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(logp_BV, token[:, None], axis=-1)[:, 0]


def _prefill(model: Transformer, params, tokens_UP, prompt_mask_UP, group: int,
             slots: int):
  """Run the U distinct prompts once and copy their KV cache to each of the ``group``
  rows that continue them (row u * group + g): the prompt's compute is paid once per
  group, not once per sample. Only the last position is unembedded (the [P, vocab] logits
  of the prompt are never computed). Returns (last logits [B, V], cache, next position)."""
  U, P = tokens_UP.shape
  cache = init_cache(model.cfg, U, slots, model.dtype)
  cache["valid"] = cache["valid"].at[:, :P].set(prompt_mask_UP)
  positions = jnp.maximum(jnp.cumsum(prompt_mask_UP, axis=1) - 1, 0)  # left padding
  h, cache = model.apply({"params": params}, tokens_UP, positions, None, cache,
                         method="hidden")
  logits = model.apply({"params": params}, h[:, -1:], method="logits")[:, 0]
  rep = lambda x, axis: jnp.repeat(x, group, axis=axis) if group > 1 else x
  cache = {"k": rep(cache["k"], 1), "v": rep(cache["v"], 1), "valid": rep(cache["valid"], 0),
           "end": cache["end"]}
  return rep(logits, 0), cache, rep(positions[:, -1] + 1, 0)


@functools.partial(jax.jit, static_argnames=("model", "group", "max_new_tokens",
                                             "temperature", "top_p", "eos_id", "pad"))
def _sample(model: Transformer, params, tokens_UP, prompt_mask_UP, key, adapter_ids_U, *,
            group: int, max_new_tokens: int, temperature: float, top_p: float,
            eos_id: int | None, pad: int) -> Samples:
  B = tokens_UP.shape[0] * group
  keys = key if key.ndim == 2 else jax.vmap(lambda r: jax.random.fold_in(key, r))(
      jnp.arange(B))
  # stacked adapters: each prompt's rows through its own adapter, its samples (rows
  # u * group + g) through the same; the ids are data, so any mix runs this one program
  with _ids(adapter_ids_U):
    prefilled = _prefill(model, params, tokens_UP, prompt_mask_UP, group,
                         tokens_UP.shape[1] + max_new_tokens)
  with _ids(None if adapter_ids_U is None else jnp.repeat(adapter_ids_U, group)):
    return _decode(model, params, prefilled, keys, max_new_tokens, temperature, top_p,
                   eos_id, pad)


def _ids(ids):
  return contextlib.nullcontext() if ids is None else matmul.adapter_ids(ids)


def _split(keys_B):
  """Each row's key split in two: (the keys carried on, the keys used now)."""
  both = jax.vmap(jax.random.split)(keys_B)
  return both[:, 0], both[:, 1]


def _decode(model, params, prefilled, keys, max_new_tokens: int, temperature: float,
            top_p: float, eos_id: int | None, pad: int) -> Samples:
  logits, cache, position = prefilled
  B = logits.shape[0]
  keys, sub = _split(keys)
  first, first_logp = _pick(logits, temperature, top_p, sub)
  tokens = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
  logps = jnp.zeros((B, max_new_tokens), jnp.float32).at[:, 0].set(first_logp)
  done = (first == eos_id) if eos_id is not None else jnp.zeros((B,), bool)
  lengths = jnp.ones((B,), jnp.int32)

  def cond(carry):
    i, *_, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tokens, logps, lengths, cache, position, done, keys = carry
    keys, sub = _split(keys)
    last = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
    logits, cache = model.apply({"params": params}, last, position[:, None], None, cache)
    token, logp = _pick(logits[:, -1], temperature, top_p, sub)
    tokens = tokens.at[:, i].set(jnp.where(done, pad, token))
    logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
    lengths = lengths + ~done
    if eos_id is not None:
      done = done | (token == eos_id)
    return i + 1, tokens, logps, lengths, cache, position + 1, done, keys

  carry = (jnp.ones((), jnp.int32), tokens, logps, lengths, cache, position, done, keys)
  _, tokens, logps, lengths, *_ = jax.lax.while_loop(cond, body, carry)
  return Samples(tokens, logps, lengths)


def sample(model: Transformer, params, tokens_UP, prompt_mask_UP, key, *,
           max_new_tokens: int, group: int = 1, temperature: float = 1.0, top_p: float = 1.0,
           eos_id: int | None = None, pad: int = 0, adapter_ids=None) -> Samples:
  """Continue each left-padded prompt ``group`` times by up to ``max_new_tokens`` tokens.

  Args:
    model, params: the model and what it sees (``optim.model_params``: base + adapters,
      never merged).
    tokens_UP, prompt_mask_UP: U prompts left-padded to width P; mask 1 on real tokens.
      Put them on the mesh's batch sharding and the whole decode runs data-parallel.
    group: samples per prompt: B = U * group rows, row u * group + g continuing prompt u
      (each prompt is prefilled once and its KV cache copied to its group).
    key: PRNG key (unused at temperature 0): row r samples with ``fold_in(key, r)``'s
      stream, so what a row samples does not depend on the other rows of the batch; or
      one key per row ([B, 2]: rows of several runs sampled together, each with its own).
    temperature: 0 for greedy; top_p: nucleus mass (1: off).
    eos_id: a row stops after sampling it; the loop ends when every row has stopped.
    adapter_ids: with stacked adapters in ``params`` (``jlora.core.stack.with_adapters``),
      int [U]: the adapter each prompt (and its group of samples) runs through, in any mix
      and order (``matmul.adapter_ids``). Data, not a static argument: one compiled program
      for every mix of the stack's adapters, and for new adapters swapped into its slots
      (``stack.swap``).
  Returns:
    ``Samples``. Log-probs are the policy's (temperature 1, no top-p): what the learner
    recomputes, so on-policy importance ratios are 1 up to float rounding whatever the
    sampling temperature.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if group < 1:
    raise ValueError(f"group must be >= 1, got {group}")
  key = jnp.asarray(key)
  if key.ndim == 2 and key.shape[0] != len(tokens_UP) * group:
    raise ValueError(f"{key.shape[0]} keys for {len(tokens_UP) * group} rows")
  if adapter_ids is not None:
    adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
    if adapter_ids.shape != (len(tokens_UP),):
      raise ValueError(f"adapter_ids must have one id per prompt ({len(tokens_UP)}), got "
                       f"shape {adapter_ids.shape}")
  return _sample(model, params, jnp.asarray(tokens_UP, jnp.int32),
                 jnp.asarray(prompt_mask_UP, bool), key, adapter_ids, group=group,
                 max_new_tokens=max_new_tokens,
                 temperature=float(temperature), top_p=float(top_p), eos_id=eos_id, pad=pad)


def generate(model: Transformer, params, tokens_BP, *, max_new_tokens: int,
             temperature: float = 0.0, rng: jax.Array | None = None,
             prompt_mask_BP=None, adapters=None, spec=None, adapter_ids=None) -> jax.Array:
  """Continue each prompt by ``max_new_tokens`` tokens (no stop at EOS).

  Args:
    model, params: from ``jlora.models.load`` (or any Transformer and its params).
    tokens_BP: int prompts, left-padded to a common length P.
    max_new_tokens: tokens to sample per prompt.
    temperature: 0 for greedy, else softmax sampling at this temperature.
    rng: PRNG key for sampling (required when temperature > 0), or one per row
      (``sample``'s ``key``).
    prompt_mask_BP: 1 for real prompt tokens, 0 for left padding (default: all real).
    adapters, spec: sample from base + LoRA adapters; with a ``jlora.core.stack.Stack``
      as ``spec``, stacked adapters, each row through adapter ``adapter_ids[row]``.
    adapter_ids: int [B], with stacked adapters (in ``adapters``, or already in ``params``:
      ``stack.with_adapters``): the adapter of each prompt, any mix (``sample``).
  Returns:
    [B, max_new_tokens] sampled token ids.
  """
  if temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs rng")
  tokens_BP = jnp.asarray(tokens_BP, jnp.int32)
  mask = jnp.ones_like(tokens_BP, bool) if prompt_mask_BP is None else prompt_mask_BP
  if adapters is not None:
    params = (stack.with_adapters(params, adapters, spec) if isinstance(spec, stack.Stack)
              else with_adapters(params, adapters, spec))
  key = rng if rng is not None else jax.random.PRNGKey(0)
  return sample(model, params, tokens_BP, mask, key, max_new_tokens=max_new_tokens,
                temperature=temperature, adapter_ids=adapter_ids).tokens
