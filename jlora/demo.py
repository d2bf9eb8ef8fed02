"""A short LoRA fit through the public API, small enough for any CPU.

A random linen MLP is the frozen base; the target is the same network with a random
low-rank change to every kernel, which a LoRA of that rank can represent exactly. Training
only the adapters (through ``jlora.apply``, ``jlora.core.optim`` and the one train step,
``jlora.run.train_step.make_step``) recovers it. ``jlora train`` is the real-model quickstart.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import linen as nn

import jlora
from jlora.core import optim
from jlora.run import train_step


class _Mlp(nn.Module):
  hidden: int = 256

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.gelu(nn.Dense(self.hidden)(x))
    return nn.Dense(16)(x)


def run(rank: int = 8, steps: int = 300, lr: float = 3e-3, seed: int = 0, log=print) -> dict:
  """Fit the toy task; returns losses before/after and timing."""
  k_x, k_init, k_lora, k_teacher = jax.random.split(jax.random.PRNGKey(seed), 4)
  model = _Mlp()
  x = jax.random.normal(k_x, (512, 32))
  params = model.init(k_init, x)["params"]
  spec = jlora.LoraSpec(rank=rank)
  adapters = jlora.init_adapters(params, spec, k_lora)
  change = jax.tree_util.tree_map_with_path(  # same A, a random non-zero B
      lambda path, v: 0.05 * jax.random.normal(k_teacher, v.shape) if path[-1].key == "b"
      else v, adapters)
  y = model.apply({"params": jlora.merge(params, change, spec)}, x)
  log(str(jlora.describe(params, spec)))

  def squared_error(trainable, frozen, batch):  # (sum, count): train_step.make_step divides
    pred = jlora.apply(model.apply, {"params": optim.combine(trainable["full"], frozen)},
                       trainable["lora"], spec, batch["x"])
    err = (pred - batch["y"]) ** 2
    return jnp.sum(err), jnp.float32(err.size)

  @jax.jit
  def mse(trainable, frozen, batch):
    total, count = squared_error(trainable, frozen, batch)
    return total / count

  trainable, frozen = optim.trainable(params, adapters, spec)
  tx = optim.optimizer(lr)
  step, state = train_step.build(squared_error, tx, trainable, frozen)
  batch = {"x": x, "y": y}
  before = float(mse(state["trainable"], frozen, batch))
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, frozen, batch)
    if (i + 1) % max(steps // 5, 1) == 0:
      log(f"step {i + 1:4d}  loss {float(metrics['loss']):.5f}")
  seconds = time.perf_counter() - start
  after = float(mse(state["trainable"], frozen, batch))
  log(f"loss {before:.5f} -> {after:.5f} ({before / after:.1f}x lower) in {steps} steps, "
      f"{seconds:.1f} s")
  return {"before": before, "after": after, "seconds": seconds}
