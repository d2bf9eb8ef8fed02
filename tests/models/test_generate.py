"""jlora.models.generate: cached generation equals uncached, left-padded prompts generate
as unpadded, sampling is seeded, top-p keeps the nucleus; a mixed-adapter batch generates
what each adapter generates alone, in one compiled program for any mix."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import models
from jlora.core import lora, optim, stack
from jlora.models.generate import _sample  # the jitted engine: its compile cache
from jlora.objectives.rl import losses, rollouts
from tests.helpers import CFG, random_tokens, randomize_b, tiny_model, tiny_policy


def _generate_without_cache(model, params, tokens, n):
  tokens = jnp.asarray(tokens)
  forward = jax.jit(model.apply)
  for _ in range(n):
    logits, _ = forward({"params": params}, tokens)
    tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1:], -1)], axis=1)
  return tokens


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_cached_generation_equals_uncached(hf_checkpoints, kind):
  model, params, _ = models.load(hf_checkpoints[kind])
  prompt = random_tokens(2, 7, seed=3)
  cached = models.generate(model, params, prompt, max_new_tokens=10)
  uncached = _generate_without_cache(model, params, prompt, 10)[:, 7:]
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
  assert len(np.unique(np.asarray(cached))) > 2  # varied tokens, not one repeated


def test_left_padded_prompts_generate_like_unpadded(hf_checkpoints):
  model, params, _ = models.load(hf_checkpoints["llama"])
  short, long_ = random_tokens(1, 4, seed=4), random_tokens(1, 7, seed=5)
  padded = np.concatenate([np.zeros((1, 3), int), short], axis=1)
  batch = np.concatenate([padded, long_], axis=0)
  mask = np.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
  out = models.generate(model, params, batch, max_new_tokens=6, prompt_mask_BP=mask)
  alone = models.generate(model, params, short, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(alone[0]))


def test_sampling_is_seeded(hf_checkpoints):
  model, params, _ = models.load(hf_checkpoints["llama"])
  prompt = random_tokens(2, 5)
  run = lambda seed: models.generate(model, params, prompt, max_new_tokens=8,
                                     temperature=1.0, rng=jax.random.PRNGKey(seed))
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))
  with pytest.raises(ValueError, match="needs rng"):
    models.generate(model, params, prompt, max_new_tokens=2, temperature=0.7)


def test_top_p_keeps_the_nucleus():
  model, plan, trainable, frozen = tiny_policy()
  params = optim.model_params(trainable, frozen, plan)
  tokens = np.asarray([[5, 6, 7, 8]] * 2, np.int32)
  greedy = models.sample(model, params, tokens, np.ones_like(tokens), jax.random.PRNGKey(1),
                         group=4,
                         max_new_tokens=5, temperature=0.0)
  tiny_p = models.sample(model, params, tokens, np.ones_like(tokens), jax.random.PRNGKey(0),
                         group=4, max_new_tokens=5, temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)  # only the top token is left
  free = models.sample(model, params, tokens, np.ones_like(tokens), jax.random.PRNGKey(0),
                       group=4, max_new_tokens=5, temperature=1.0)
  assert not np.array_equal(free.tokens, greedy.tokens)


# --- mixed-adapter generation: one batch whose rows each run their own adapter of a stack
# (models.sample(adapter_ids=...)), against each adapter's own generation; one compiled
# program for any mix and for adapters swapped into the stack's slots

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


def test_what_a_row_samples_does_not_depend_on_the_other_rows(served):
  """Row r samples with fold_in(key, r) (or the key given for it): a prompt sampled in a
  batch gives what it gives alone with that row's key, whatever shares the batch."""
  model, params, st, solos, slots, prompts = served
  tokens, mask = rollouts.left_pad(prompts[:3], 8)
  key = jax.random.PRNGKey(5)
  together = np.asarray(models.sample(model, params, tokens, mask, key, max_new_tokens=6,
                                      temperature=1.0).tokens)
  for r in range(3):
    own = jax.random.fold_in(key, r)[None]  # one key per row: [1, 2]
    alone = np.asarray(models.sample(model, params, tokens[r:r + 1], mask[r:r + 1], own,
                                     max_new_tokens=6, temperature=1.0).tokens)[0]
    np.testing.assert_array_equal(together[r], alone, err_msg=f"row {r}")
  other = np.asarray(models.sample(model, params, tokens, mask, jax.random.PRNGKey(6),
                                   max_new_tokens=6, temperature=1.0).tokens)
  assert np.any(other != together)  # the key matters


def test_a_group_prefilled_once_samples_what_its_rows_sample_each_with_its_prompt(served):
  """Rows of several runs sampled together (RL's ``sample_together``): each prompt
  prefilled once for its group of samples, one key per row and one adapter per prompt,
  samples what the same rows sample with every row prefilling its own copy of the prompt."""
  model, params, st, solos, slots, prompts = served
  tokens, mask = rollouts.left_pad(prompts[:4], 8)
  ids = np.array([2, 0, 1, 2])
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(9), r))(jnp.arange(12))
  shared = models.sample(model, slots, tokens, mask, keys, max_new_tokens=6, group=3,
                         temperature=1.0, adapter_ids=ids)
  each = models.sample(model, slots, np.repeat(tokens, 3, 0), np.repeat(mask, 3, 0), keys,
                       max_new_tokens=6, temperature=1.0, adapter_ids=np.repeat(ids, 3))
  np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(each.tokens))
  np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(each.logprobs),
                             atol=2e-5)
  assert len({tuple(row) for row in np.asarray(shared.tokens)}) > 4  # rows differ
