"""jlora.objectives.rl.losses: the policy-gradient loss against an independent computation,
PPO's clip region, group centring, KL to the base at init and after."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.core import optim
from jlora.objectives import lm
from jlora.objectives.rl import losses, rollouts
from tests.helpers import N, hand_episodes, tiny_policy


def _independent_logprobs(model, params, prompts, ep):
  """Each row alone, unpadded (positions 0..), its completion's log-probs: no masks, no
  left padding, no chunking, no shift bookkeeping shared with the code under test."""
  out = []
  for prompt, tokens, n in zip(prompts, ep.tokens, ep.lengths):
    seq = jnp.asarray(np.concatenate([prompt, tokens[:n]]))[None]
    logits, _ = model.apply({"params": params}, seq)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, seq[0, 1:, None], axis=-1)[:, 0]
    out.append(picked[-n:])
  return out


def test_group_centering_and_constant_groups():
  np.testing.assert_array_equal(losses.advantages([1, 0, 0, 1], 4), [0.5, -0.5, -0.5, 0.5])
  np.testing.assert_allclose(losses.advantages([1, 0, 0, 1, 3, 1], 3),
                             [2 / 3, -1 / 3, -1 / 3, -2 / 3, 4 / 3, -2 / 3], rtol=1e-6)
  np.testing.assert_allclose(losses.advantages([1, 0, 0, 1], 4, normalize_std=True),
                             [1, -1, -1, 1], rtol=1e-5)
  np.testing.assert_array_equal(losses.constant_groups([1, 1, 0, 1, 2, 2], 2),
                                [True, True, False, False, True, True])


def test_ppo_clip_region_is_exact_at_the_boundaries():
  eps = 0.2
  r = jnp.asarray([0.7, 0.8, 1.0, 1.2, 1.3], jnp.float32)  # 0.8 and 1.2: the boundaries
  for adv, want, clipped in (
      (1.0, [-0.7, -0.8, -1.0, -1.2, -1.2], [0, 0, 0, 0, 1]),
      (-1.0, [0.8, 0.8, 1.0, 1.2, 1.3], [1, 0, 0, 0, 0])):
    loss, was = losses.per_token(r, jnp.float32(adv), "ppo", eps)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_array_equal(was, clipped)
    # strictly inside: the gradient is -A; strictly past the clip in A's favour: 0
    grad = jax.grad(lambda x: jnp.sum(losses.per_token(x, adv, "ppo", eps)[0]))(r)
    strict = np.array([0, 2, 4])
    np.testing.assert_allclose(np.asarray(grad)[strict],
                               [-adv if c == 0 else 0.0 for c in np.asarray(clipped)[strict]])
  loss, _ = losses.per_token(r, jnp.float32(2.0), "importance_sampling", eps)
  np.testing.assert_allclose(loss, -2.0 * np.asarray(r))


@pytest.mark.parametrize("off_policy", [False, True])
def test_policy_gradient_equals_an_independent_computation(off_policy):
  model, plan, trainable, frozen = tiny_policy()
  ep, prompts = hand_episodes()
  adv = np.random.default_rng(1).normal(size=len(prompts)).astype(np.float32)
  batch = rollouts.training_batch(ep, adv, np.ones(len(prompts), bool))
  params = optim.model_params(trainable, frozen, plan)
  learner = lm.token_logprobs(model, params, batch, chunk=16, last=N)
  shift = np.random.default_rng(2).normal(0, 0.1, learner.shape) if off_policy else 0.0
  batch["sampler_logprobs"] = np.asarray(learner + shift, np.float32) * batch["mask"]
  loss_fn = losses.policy_loss(model, plan, chunk=16)
  total, count, aux = loss_fn(trainable, frozen, batch)
  assert count == sum(ep.lengths)
  if not off_policy:  # on-policy the ratio is 1, exactly
    assert float(aux["ratio_min"]) == float(aux["ratio_max"]) == 1.0
    assert float(aux["ratio_mean"]) == float(count)
  # The sampler's log-probs, per row, in the independent layout.
  fixed = [np.asarray(batch["sampler_logprobs"][i, :n])
           for i, n in enumerate(ep.lengths)]

  def independent(tr):  # -sum_t A * p / p_sampler, mean over the batch's tokens
    logps = _independent_logprobs(model, optim.model_params(tr, frozen, plan), prompts, ep)
    terms = [a * jnp.exp(lp - f) for a, lp, f in zip(adv, logps, fixed)]
    return -sum(jnp.sum(t) for t in terms) / sum(ep.lengths)

  got = jax.jit(jax.grad(lambda tr: loss_fn(tr, frozen, batch)[0] / count))(trainable)
  want = jax.jit(jax.grad(independent))(trainable)
  if not off_policy:  # on-policy it is REINFORCE: -sum_t A grad log p
    reinforce = jax.jit(jax.grad(lambda tr: -sum(
        a * jnp.sum(lp) for a, lp in zip(adv, _independent_logprobs(
            model, optim.model_params(tr, frozen, plan), prompts, ep))) / sum(ep.lengths)))
    for x, y in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(reinforce(
        trainable))):
      np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-6)
  # atol: f32 gradients of two layouts of the same sums, ~1e-4 of the largest element
  # (observed 2e-6 off-policy); a missing or inverted importance ratio moves them by ~10%.
  scale = max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(got))
  for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4 * scale)
  assert scale > 1e-4


def test_kl_to_the_base_is_zero_at_init_and_positive_after():
  for b_scale, zero in ((0.0, True), (0.3, False)):
    model, plan, trainable, frozen = tiny_policy(b_scale=b_scale)
    ep, _ = hand_episodes()
    batch = rollouts.training_batch(ep, np.ones(8, np.float32), np.ones(8, bool))
    batch["sampler_logprobs"] = np.zeros_like(batch["mask"])
    # the reference: the base with adapters off (the frozen params themselves)
    batch["ref_logprobs"] = losses.reference_logprobs(model)(
        optim.combine(trainable["full"], frozen), batch)
    _, count, aux = losses.policy_loss(model, plan, kl_coef=0.1)(trainable, frozen, batch)
    kl = float(aux["kl"]) / float(count)
    assert (kl == 0.0) if zero else kl > 1e-4
