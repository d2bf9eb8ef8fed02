"""One step of N adapters stacked over one base (the step ``jlora train A B ...`` runs)
against the solo step of one adapter, at the same rows per adapter: tokens/s of each and
their ratio (the issue's GPU goal: 64 adapters x 4 rows together >= 5x the tokens/s of
the solo step, which is what 64 solo steps one after another give).

    python -m bench.group_step [--adapters 64] [--rows 4] [--seq 512] [--layers 30]
                               [--dtype bfloat16] [--repeats 10] [--smoke] [--json FILE]

The model is SmolLM2-135M's shape (d=576, FFN 1536, 9 / 3 heads, vocab 49152) with random
weights and ``--layers`` layers; every adapter has LoRA r=16 on all 7 projections (ranks
8 and 16 alternate with ``--mixed-ranks``), its own LR, AdamW, the trainer's chunked loss;
both steps come from ``train_step.build`` (jitted, donated, compiled ahead), timed as the
median of ``--repeats`` after two warm-ups. The group's batch is laid out as ``jlora
train`` lays out runs of equal rows (``group.GroupBatches(micro=N)``: micro-batches of one
run each); ``--at-once`` runs all rows in one pass instead (``lm.stacked_lm_loss`` over
rows grouped by adapter, the functional API's layout).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bench.common import block, median_ms, save_json, stamped
from bench.train_step import LOSS_CHUNK, SMOL
from jlora import models
from jlora.core import lora, optim, stack
from jlora.data import pipeline
from jlora.infra import mesh as mesh_lib
from jlora.models import ModelConfig, Transformer
from jlora.objectives import lm
from jlora.run import group, train_step


def _batch(rows: int, seq: int, vocab: int, seed: int) -> dict:
  return jax.device_put(pipeline.lm_batch(pipeline.random_tokens(vocab, rows, seq, seed)),
                        jax.devices()[0])


def _timed(step, state, frozen, batch, repeats: int) -> float:
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], frozen, batch)
    block(metrics)
  return median_ms(run, repeats)


class _Rows:
  """A batch source that gives the same host rows every step (``group.GroupBatches``'s)."""

  def __init__(self, batch: dict):
    self.batch = batch

  def rows(self) -> dict:
    return self.batch


def measure(adapters: int, rows: int, seq: int, layers: int, dtype: str, repeats: int,
            mixed_ranks: bool, smoke: bool, at_once: bool = False) -> dict:
  shape = {**SMOL, "num_layers": layers}
  if smoke:
    shape.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4,
                 num_kv_heads=2, head_dim=16)
  cfg = ModelConfig(**shape).replace(remat=True)  # as configs/quickstart.toml trains
  model = Transformer(cfg, dtype=jnp.dtype(dtype))
  tokens = pipeline.random_tokens(cfg.vocab_size, 1, 8)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens[:, :-1]))["params"]
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)  # the frozen base
  ranks = [(8 if mixed_ranks and i % 2 else 16) for i in range(adapters)]
  specs = [models.lora_spec(cfg, rank=r) for r in ranks]
  lrs = [1e-4 * (1 + i % 3) for i in range(adapters)]
  # solo: adapter 0 alone, its own optimizer
  solo_plan = lora.plan(params, specs[0])
  adapters0 = lora.init_adapters(params, solo_plan, jax.random.PRNGKey(0))
  trainable, frozen = optim.trainable(params, adapters0, solo_plan)
  batch = _batch(rows, seq, cfg.vocab_size, 0)
  step, state = train_step.build(lm.lm_loss(model, solo_plan, LOSS_CHUNK),
                                 optim.optimizer(lrs[0]), trainable, frozen,
                                 example_batch=batch)
  solo_ms = _timed(step, state, frozen, batch, repeats)
  del step, state, trainable
  # the group: every adapter's rows, as jlora train lays them out (group.Stacked): runs of
  # equal rows as micro-batches of one run each; --at-once: all rows in one pass
  st = stack.stack(params, specs)
  stacked = stack.init_adapters(params, st, [jax.random.PRNGKey(i) for i in range(adapters)])
  trainable = {"lora": stacked, "full": {}}
  micro = None if at_once else adapters
  host = [pipeline.lm_batch(pipeline.random_tokens(cfg.vocab_size, rows, seq, i))
          for i in range(adapters)]
  mesh = mesh_lib.single_device_mesh()
  group_batch = (mesh_lib.global_batch({k: np.concatenate([b[k] for b in host])
                                        for k in host[0]}, mesh) if at_once else
                 group.GroupBatches([_Rows(b) for b in host], mesh, micro).next(None))
  step, state = train_step.build(
      lm.stacked_lm_loss(model, st, tuple([rows] * adapters), LOSS_CHUNK),
      stack.optimizer(st, lrs), trainable, frozen, grad_accum=micro or 1,
      adapter_axes=stack.adapter_axes(st), example_batch=group_batch)
  group_ms = _timed(step, state, frozen, group_batch, repeats)
  solo_tps = rows * seq / (solo_ms / 1e3)
  group_tps = rows * seq * adapters / (group_ms / 1e3)
  return {"adapters": adapters, "rows": rows, "seq": seq, "layers": layers, "dtype": dtype,
          "ranks": sorted(set(ranks)), "solo_ms": solo_ms, "group_ms": group_ms,
          "solo_tokens_per_s": solo_tps, "group_tokens_per_s": group_tps,
          "ratio": group_tps / solo_tps, "layout": "at once" if at_once else "micro-batches"}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--adapters", type=int, default=64)
  p.add_argument("--rows", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--mixed-ranks", action="store_true")
  p.add_argument("--at-once", action="store_true",
                 help="every adapter's rows in one pass (the functional API's layout: "
                      "matmul.adapter_rows), not micro-batches of one run each (jlora train's)")
  p.add_argument("--smoke", action="store_true", help="toy shapes: checks that it runs")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.smoke:
    args.adapters, args.rows, args.seq, args.layers, args.repeats = 4, 2, 32, 2, 1
  result = measure(args.adapters, args.rows, args.seq, args.layers, args.dtype,
                   args.repeats, args.mixed_ranks, args.smoke, args.at_once)
  stamped(result)
  print(f"{args.adapters} adapters x {args.rows} rows x {args.seq} tokens, {args.layers} "
        f"layers, {args.dtype}, {result['layout']}: solo step {result['solo_ms']:.1f} ms "
        f"({result['solo_tokens_per_s']:,.0f} tok/s), group step {result['group_ms']:.1f} ms "
        f"({result['group_tokens_per_s']:,.0f} tok/s): {result['ratio']:.2f}x the tokens/s")
  return save_json(result, args.json)


if __name__ == "__main__":
  main()
