"""jlora.objectives.lm: the chunked cross-entropy equals the loss over full logits."""

import jax
import numpy as np


def test_chunked_loss_equals_full_logits_loss(model_dir):
  from jlora import models
  from jlora.objectives import lm
  model, params, _ = models.load(model_dir)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 300, (2, 24)), "targets": rng.integers(0, 300, (2, 24)),
           "mask": rng.integers(0, 2, (2, 24))}
  full = jax.value_and_grad(lambda p: lm.token_loss_sum(model, p, batch)[0])(params)
  chunked = jax.value_and_grad(lambda p: lm.token_loss_sum(model, p, batch, 7)[0])(params)
  np.testing.assert_allclose(full[0], chunked[0], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(full[1]), jax.tree_util.tree_leaves(chunked[1])):
    np.testing.assert_allclose(a, b, atol=1e-6)
