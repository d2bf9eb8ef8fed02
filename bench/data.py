"""Input pipeline throughput vs what the training step consumes (issue: data >= 10x).

    python -m bench.data [--fortunes DIR] [--batches 200]

Pipeline: the quickstart's data (task:arithmetic rendered with SmolLM2's chat template,
packed into 8 x 128 rows), and optionally a text corpus (``jlora data fetch fortunes``).
tokens/s counts row slots produced (batch x seq_len per batch: what a step consumes) and
real (non-padding) tokens. Consumption: the step `jlora train` runs (``train_step.build``
over the chunked ``lm.lm_loss``, compiled ahead) for SmolLM2-135M LoRA (r=16, all
layers) on the same batch shape, measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from bench.common import block, machine_line, median_ms
import jlora
from jlora import data, models
from jlora.core import lora, optim
from jlora.infra import mesh as mesh_lib
from jlora.objectives import lm
from jlora.run import config, train_step

SEQ, BATCH = 128, 8


def pipeline_rate(cfg: data.DataConfig, tok, batches: int) -> tuple[float, float]:
  it = iter(data.dataset(cfg, tok, process_index=0, process_count=1))
  next(it)  # start-up (source open, first tokenisation) is not throughput
  real = 0
  start = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    real += int((b["segment_ids"] > 0).sum()) if "segment_ids" in b else int(b["mask"].sum())
  seconds = time.perf_counter() - start
  it.close()
  return batches * cfg.batch_size * cfg.seq_len / seconds, real / seconds


def step_ms(batch: dict) -> float:
  """ms per step of `jlora train`'s step (chunked loss, donated state, compiled ahead)."""
  model, params, cfg = models.load(models.smollm2_gguf(), remat=True)
  plan = lora.plan(params, models.lora_spec(cfg, rank=16))
  adapters = jax.jit(lambda p: jlora.init_adapters(p, plan, jax.random.PRNGKey(0)))(params)
  trainable, frozen = optim.trainable(params, adapters, plan)
  tx = optim.optimizer(1e-4)
  mesh = mesh_lib.make_mesh()
  loss = lm.lm_loss(model, plan, config.TrainSection().loss_chunk)
  batch = mesh_lib.global_batch(batch, mesh)
  step, state = train_step.build(loss, tx, trainable, frozen, mesh, example_batch=batch)
  holder = {"state": state, "step": step}

  def run():
    holder["state"], metrics = holder["step"](holder["state"], frozen, batch)
    block(metrics)

  return median_ms(run, repeats=3, warmup=1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--fortunes", help="directory from `jlora data fetch fortunes`")
  parser.add_argument("--batches", type=int, default=200)
  args = parser.parse_args(argv)
  tok = data.Tokenizer.from_model(models.smollm2_gguf())
  print(f"# machine: {machine_line()}")
  quick = data.DataConfig(source="task:arithmetic", seq_len=SEQ, batch_size=BATCH)
  rows = [("task:arithmetic (chat, packed)", quick)]
  if args.fortunes:
    rows.append(("fortunes (text, packed)",
                 data.DataConfig(source=args.fortunes, separator="\n%\n", seq_len=SEQ,
                                 batch_size=BATCH)))
  rates = {}
  for name, cfg in rows:
    slots, real = pipeline_rate(cfg, tok, args.batches)
    rates[name] = slots
    print(f"pipeline {name:32s} {slots:10.0f} row tokens/s  {real:10.0f} real tokens/s")
  batch = next(iter(data.dataset(quick, tok, process_index=0, process_count=1)))
  ms = step_ms({k: np.asarray(v) for k, v in batch.items()})
  consumed = BATCH * SEQ / (ms / 1e3)
  print(f"train step SmolLM2-135M LoRA r=16, {BATCH}x{SEQ}: {ms:.0f} ms/step = "
        f"{consumed:.0f} tokens/s consumed")
  for name, slots in rates.items():
    print(f"ratio pipeline/consumption {name:32s} {slots / consumed:8.1f}x (need >= 10x)")


if __name__ == "__main__":
  main()
