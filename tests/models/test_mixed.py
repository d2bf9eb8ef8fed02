"""Mixed-adapter generation: one batch whose rows each run their own adapter of a stack
(``models.sample(adapter_ids=...)``), against each adapter's own generation; one compiled
program for any mix and for adapters swapped into the stack's slots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import models
from jlora.core import lora, stack
from jlora.models.generate import _sample  # the jitted engine: its compile cache
from jlora.objectives.rl import losses, rollouts
from tests.helpers import CFG, randomize_b, tiny_model

# ranks, alphas and target sets all differ
SPECS = [models.lora_spec(CFG, rank=2),
         models.lora_spec(CFG, rank=4, alpha=16.0, targets="attn"),
         models.lora_spec(CFG, rank=1, alpha=8.0, targets="mlp", rslora=True)]


@pytest.fixture(scope="module")
def served():
  model, params = tiny_model(3)
  st = stack.stack(params, SPECS)
  solos = [randomize_b(lora.init_adapters(params, p, jax.random.PRNGKey(30 + i)),
                       jax.random.PRNGKey(40 + i), 0.5) for i, p in enumerate(st.plans)]
  slots = stack.with_adapters(params, stack.stack_adapters(solos, st), st)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, CFG.vocab_size, n) for n in (5, 3, 7, 4, 6)]
  return model, params, st, solos, slots, prompts


def _solo_greedy(model, params, adapter, own, prompt, n):
  tokens, mask = rollouts.left_pad([prompt], len(prompt))
  return np.asarray(models.sample(model, lora.with_adapters(params, adapter, own), tokens,
                                  mask, jax.random.PRNGKey(0), max_new_tokens=n,
                                  temperature=0.0).tokens[0])


def test_a_mixed_batch_generates_what_each_adapter_generates_alone(served):
  model, params, st, solos, slots, prompts = served
  ids = [2, 0, 1, 0, 2]  # any order, an adapter on several rows
  tokens, mask = rollouts.left_pad(prompts, 8)
  got = np.asarray(models.sample(model, slots, tokens, mask, jax.random.PRNGKey(0),
                                 max_new_tokens=6, temperature=0.0, adapter_ids=ids).tokens)
  plain = np.asarray(models.sample(model, params, tokens, mask, jax.random.PRNGKey(0),
                                   max_new_tokens=6, temperature=0.0).tokens)
  for row, (i, prompt) in enumerate(zip(ids, prompts)):
    want = _solo_greedy(model, params, solos[i], st.plans[i], prompt, 6)
    np.testing.assert_array_equal(got[row], want, err_msg=f"row {row}, adapter {i}")
  assert np.any(got != plain)  # the adapters change what is generated
  # models.generate takes the stack itself
  again = models.generate(model, params, tokens, prompt_mask_BP=mask, max_new_tokens=6,
                          adapters=stack.stack_adapters(solos, st), spec=st, adapter_ids=ids)
  np.testing.assert_array_equal(np.asarray(again), got)


def test_one_program_for_any_mix_and_for_an_adapter_swapped_into_a_slot(served):
  model, params, st, solos, slots, prompts = served
  tokens, mask = rollouts.left_pad(prompts[:4], 8)
  run = lambda p, ids: np.asarray(models.sample(  # noqa: E731
      model, p, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=5, temperature=0.0,
      adapter_ids=ids).tokens)
  run(slots, [0, 1, 2, 0])
  compiled = _sample._cache_size()
  run(slots, [1, 1, 1, 1])
  # a new adapter (another rank and targets) into slot 1: rank 3 <= the slot's 4 on attn
  new_spec = models.lora_spec(CFG, rank=3, alpha=12.0, targets="attn")
  own = lora.plan(params, new_spec)
  new = randomize_b(lora.init_adapters(params, own, jax.random.PRNGKey(7)),
                    jax.random.PRNGKey(8), 0.5)
  swapped = stack.swap(slots, st, 1, new, own)
  got = run(swapped, [1, 0, 1, 2])
  assert _sample._cache_size() == compiled  # no recompilation
  for row, i in enumerate([1, 0, 1, 2]):
    adapter, plan = (new, own) if i == 1 else (solos[i], st.plans[i])
    want = _solo_greedy(model, params, adapter, plan, prompts[row], 5)
    np.testing.assert_array_equal(got[row], want, err_msg=f"row {row}")
  # what does not fit the slots is one line naming it
  with pytest.raises(ValueError, match=r"rank 8 at 'layers/attn/\w+/kernel', above the slots' 4"):
    big = lora.plan(params, models.lora_spec(CFG, rank=8, targets="attn"))
    stack.swap(slots, st, 1, lora.init_adapters(params, big, jax.random.PRNGKey(0)), big)
  with pytest.raises(ValueError, match="slot 3 is not one of the stack's 3"):
    stack.swap(slots, st, 3, new, own)
  with pytest.raises(ValueError, match="one id per prompt"):
    run(slots, [0, 1])


def test_sampled_logprobs_under_mixed_adapters_are_each_learners(served):
  """What RL's sampler records for a row is what the learner recomputes for it under the
  row's own adapter (temperature 1, two samples per prompt)."""
  model, params, st, solos, slots, prompts = served
  ids = np.array([1, 2, 0, 1])
  tokens, mask = rollouts.left_pad(prompts[:4], 8)
  out = models.sample(model, slots, tokens, mask, jax.random.PRNGKey(3), max_new_tokens=5,
                      group=2, temperature=1.0, adapter_ids=ids)
  ep = rollouts.Episodes([{}] * 8, np.repeat(tokens, 2, 0), np.repeat(mask, 2, 0),
                         np.asarray(out.tokens), np.asarray(out.logprobs),
                         np.asarray(out.lengths), [""] * 8)
  batch = rollouts.training_batch(ep, np.zeros(8), np.ones(8, bool))
  learner = losses.reference_logprobs(model)
  for row, i in enumerate(np.repeat(ids, 2)):
    one = {k: v[row:row + 1] for k, v in batch.items()}
    want = np.asarray(learner(lora.with_adapters(params, solos[i], st.plans[i]), one))[0]
    real = one["mask"][0] > 0
    np.testing.assert_allclose(np.asarray(out.logprobs)[row][real], want[real], atol=2e-5,
                               err_msg=f"row {row}, adapter {i}")
  assert np.any(jnp.asarray(out.logprobs) != 0)
