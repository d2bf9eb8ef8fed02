"""jlora.core.optim: optimizer state only for adapters, frozen leaves bit-identical, a toy
fit, LoRA+, rank invariance at step zero, the LR schedules."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.core import optim
from jlora.run import train_step
from tests.flax_models import Mlp
from tests.helpers import randomize_b


def _setup(rank=4, full=(), hidden=32, key=jax.random.PRNGKey(0)):
  model = Mlp(hidden=hidden, out=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (256, 8))
  params = model.init(jax.random.PRNGKey(2), x)["params"]
  spec = jlora.LoraSpec(rank=rank, alpha=8, full=full)
  adapters = jlora.init_adapters(params, spec, key)
  # Teacher: the same base with a random low-rank change, so LoRA can represent it.
  teacher = jlora.merge(params, randomize_b(adapters, jax.random.PRNGKey(3), 0.3), spec)
  y = model.apply({"params": teacher}, x)

  def loss_fn(trainable, frozen, x, y):
    params_ = optim.combine(trainable["full"], frozen)
    pred = jlora.apply(model.apply, {"params": params_}, trainable["lora"], spec, x)
    return jnp.mean((pred - y) ** 2)

  return params, spec, adapters, loss_fn, x, y


def _step(loss_fn, tx, trainable, frozen):
  """The one train step (``train_step.make_step``) over this file's mean losses
  ``loss_fn(trainable, frozen, *batch)``, and a fresh state for it."""
  return train_step.build(lambda tr, fr, batch: (loss_fn(tr, fr, *batch), jnp.float32(1.0)),
                          tx, trainable, frozen)


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def test_optimizer_state_only_for_adapters():
  params, spec, adapters, *_ = _setup()
  tx = optim.optimizer(1e-3)
  trainable, frozen = optim.trainable(params, adapters, spec)
  state = tx.init(trainable)
  reference = optax.adamw(1e-3).init(adapters)  # Adam on the adapters alone
  big = lambda t: [x for x in jax.tree_util.tree_leaves(t) if x.size > 1]
  assert len(big(state)) == len(big(reference)) == 2 * len(jax.tree_util.tree_leaves(adapters))
  assert _bytes(big(state)) == _bytes(big(reference)) == 2 * _bytes(adapters)
  # The same optimizer on a tree that also holds the frozen base keeps no state for it.
  state_all = tx.init({**trainable, "frozen": frozen})
  assert _bytes(big(state_all)) == _bytes(big(state))


def test_frozen_bit_identical_and_trainable_updated():
  params, spec, adapters, loss_fn, x, y = _setup(full=("Dense_2/bias",))
  trainable, frozen = optim.trainable(params, adapters, spec)
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  trainable_before = jax.tree_util.tree_map(np.array, trainable)
  step, state = _step(loss_fn, optim.optimizer(1e-2), trainable, frozen)
  for _ in range(10):
    state, _ = step(state, frozen, (x, y))
  trainable = state["trainable"]
  for a, b in zip(jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != np.asarray(b))),
                                 trainable_before, trainable)
  assert all(jax.tree_util.tree_leaves(moved["lora"])), "every adapter factor must move"
  assert moved["full"]["Dense_2"]["bias"]
  assert "Dense_2" not in frozen or "bias" not in frozen["Dense_2"]


def test_lora_fits_a_toy_task():
  params, spec, adapters, loss_fn, x, y = _setup()
  trainable, frozen = optim.trainable(params, adapters, spec)
  first = float(loss_fn(trainable, frozen, x, y))
  step, state = _step(loss_fn, optim.optimizer(1e-2), trainable, frozen)
  for _ in range(300):
    state, metrics = step(state, frozen, (x, y))
  loss = float(loss_fn(state["trainable"], frozen, x, y))
  assert first / loss >= 5.0, (first, loss)


def test_lora_plus_scales_the_b_learning_rate():
  params, spec, adapters, loss_fn, x, y = _setup()
  adapters = randomize_b(adapters, jax.random.PRNGKey(4))
  trainable, frozen = optim.trainable(params, adapters, spec)
  grads = jax.grad(loss_fn)(trainable, frozen, x, y)

  def first_update(ratio):
    tx = optim.optimizer(1e-3, b_lr_ratio=ratio)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    return updates["lora"]["Dense_1"]["kernel"]

  plain, plus = first_update(1.0), first_update(16.0)
  np.testing.assert_allclose(plus["b"], 16.0 * plain["b"], rtol=1e-5)
  np.testing.assert_allclose(plus["a"], plain["a"], rtol=1e-6)
  with pytest.raises(ValueError, match="b_lr_ratio"):
    optim.optimizer(1e-3, b_lr_ratio=0)


def test_rank_invariance_at_step_zero():
  """FINDINGS 3: with alpha/r and B = 0, Adam's first step changes the loss by the same
  amount whatever the rank (the update is a mean of r rank-1 terms)."""
  model = Mlp(hidden=256, out=64)
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
  params = model.init(jax.random.PRNGKey(2), x)["params"]
  y = jax.random.normal(jax.random.PRNGKey(3), (64, 64))
  changes = {}
  for rank in (1, 4, 16, 64):
    spec = jlora.LoraSpec(rank=rank, targets=r"Dense_[12]")
    trainable, frozen = optim.trainable(params, jlora.init_adapters(params, spec,
                                                                    jax.random.PRNGKey(5)),
                                        spec)

    def loss_fn(t, f, spec=spec):
      pred = jlora.apply(model.apply, {"params": optim.combine(t["full"], f)}, t["lora"],
                         spec, x)
      return jnp.mean((pred - y) ** 2)

    before = float(loss_fn(trainable, frozen))
    step, state = _step(loss_fn, optim.optimizer(1e-4), trainable, frozen)
    new = step(state, frozen, ())[0]["trainable"]
    changes[rank] = float(loss_fn(new, frozen)) - before
  values = np.array(list(changes.values()))
  assert np.all(values < 0), changes
  assert np.max(np.abs(values / values.mean() - 1)) < 0.10, changes
  print("first-step loss change by rank:", changes)


def test_schedules():
  from jlora.core import optim
  s = optim.schedule(1.0, 10, "linear", warmup_steps=2)
  assert [round(float(s(i)), 3) for i in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
  assert optim.schedule(0.1, 100) == 0.1
  cos = optim.schedule(1.0, 10, "cosine")
  assert float(cos(0)) == 1.0 and float(cos(10)) == pytest.approx(0.0, abs=1e-6)
  assert float(cos(5)) == pytest.approx(0.5, abs=1e-6)  # (1 + cos(pi/2)) / 2
