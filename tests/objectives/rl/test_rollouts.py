"""jlora.objectives.rl.rollouts: sampling at temperature 0 equals greedy generation, and the
sampled log-probabilities equal the training batch's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import models
from jlora.core import optim
from jlora.objectives import lm
from jlora.objectives.rl import rollouts
from tests.helpers import CFG, PROMPT_LENS, N, tiny_policy


def test_sampling_at_temperature_zero_equals_greedy_generate():
  model, plan, trainable, frozen = tiny_policy()
  params = optim.model_params(trainable, frozen, plan)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(2, CFG.vocab_size, n) for n in PROMPT_LENS]
  alone = [np.asarray(models.generate(model, params, jnp.asarray(p)[None], max_new_tokens=N)[0])
           for p in prompts]
  eos = int(alone[0][2])  # row 0 stops at its 3rd token; others where this id appears
  tokens, mask = rollouts.left_pad(prompts, 8)
  out = models.sample(model, params, tokens, mask, jax.random.PRNGKey(3), group=3,
                      max_new_tokens=N, temperature=0.0, eos_id=eos, pad=0)
  for u, want in enumerate(alone):
    n = list(want).index(eos) + 1 if eos in want else N
    for g in range(3):
      row = 3 * u + g
      assert int(out.lengths[row]) == n
      np.testing.assert_array_equal(out.tokens[row, :n], want[:n])
      assert np.all(np.asarray(out.tokens[row, n:]) == 0)
  # The recorded log-probs are the learner's (up to float rounding of the cached decode).
  ep = rollouts.Episodes([{}] * 12, np.repeat(tokens, 3, 0), np.repeat(mask, 3, 0),
                         np.asarray(out.tokens), np.asarray(out.logprobs),
                         np.asarray(out.lengths), [""] * 12)
  batch = rollouts.training_batch(ep, np.zeros(12, np.float32), np.ones(12, bool))
  learner = np.asarray(lm.token_logprobs(model, params, batch, last=N)) * batch["mask"]
  np.testing.assert_allclose(learner, np.asarray(out.logprobs), atol=2e-5)
  full = np.asarray(lm.token_logprobs(model, params, batch, chunk=5))  # every position
  np.testing.assert_allclose(full[:, -N:] * batch["mask"], learner, atol=1e-5)


def test_overlong_filter_and_penalty_follow_dapo():
  """DAPO's overlong handling: ``filter`` keeps the reward of a completion cut without EOS
  but trains on none of its tokens; ``penalty`` costs (length - (L - buffer)) / buffer in
  the last ``buffer`` tokens and 1 for a cut completion; ``none`` changes nothing."""
  scores, lengths = [1.0, 1.0, 0.0, 1.0], [3, 7, 8, 8]
  ended = [True, True, True, False]  # the last one hit L = 8 without EOS
  got, keep = rollouts.overlong(scores, lengths, ended, 8, "none")
  np.testing.assert_array_equal(got, scores)
  np.testing.assert_array_equal(keep, True)
  got, keep = rollouts.overlong(scores, lengths, ended, 8, "filter")
  np.testing.assert_array_equal(got, scores)
  np.testing.assert_array_equal(keep, [True, True, True, False])
  got, keep = rollouts.overlong(scores, lengths, ended, 8, "penalty", buffer=4)
  np.testing.assert_allclose(got, [1.0, 1.0 - 3 / 4, 0.0 - 1.0, 1.0 - 1.0])
  np.testing.assert_array_equal(keep, True)
  with pytest.raises(ValueError, match="rl.overlong 'cut' is not one of none, filter, penalty"):
    rollouts.overlong(scores, lengths, ended, 8, "cut")
