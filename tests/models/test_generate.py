"""jlora.models.generate: cached generation equals uncached, left-padded prompts generate
as unpadded, sampling is seeded, top-p keeps the nucleus."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import models
from jlora.core import optim
from tests.helpers import random_tokens, tiny_policy


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
