"""`jlora dpo`'s reference: its cost in time (computed in the step vs per batch in a separate
program) and in memory (the base itself vs a copy).

    python -m bench.dpo speed [--pairs 8] [--seq-len 48] [--steps 8] [--model smollm2]
    python -m bench.dpo memory [--steps 3] [--model smollm2]
    python -m bench.dpo all [--json FILE]

``speed``: one process, SmolLM2-135M-Instruct (f32, remat off), LoRA r=16 on all layers,
``--pairs`` pairs of ``task:arithmetic_pairs`` a step (2x rows of ``--seq-len``). Two ways
of getting the reference's log-probs, each its own train step and state, timed
alternately step by step on the same batches, after compilation: ``in_step`` (the loss
runs the reference's forward itself: what ``jlora dpo`` does) and ``cached`` (a separate
jitted forward of the base per batch, its ``ref_logps`` put in the batch, then the step:
TRL's ``precompute_ref_log_probs`` done per batch). Reported: median ms per step of each
(the cached one's forward included), their ratio, and that both give the same loss.

``memory``: one ``jlora dpo`` run per configuration (``dpo.run``, the CLI's code path), each
in its own process: LoRA and full fine-tuning, each with ``sigmoid`` (a reference) and
``simpo`` (none). The loop's peak RSS (from the first evaluation on: ``common.PhasePeaks``)
with and without the reference: under LoRA the reference is the frozen base already in
memory; under full fine-tuning it is a copy of the initial weights (~540 MB for SmolLM2):
the copied reference the LoRA run avoids.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from bench import common

MEMORY = {"lora-simpo": ("lora", "simpo"), "lora-sigmoid": ("lora", "sigmoid"),
          "full-simpo": ("full", "simpo"), "full-sigmoid": ("full", "sigmoid")}


def _config(model: str, run_dir: str, steps: int, method: str = "lora", loss: str = "sigmoid",
            pairs: int = 8, seq_len: int = 48, evaluate: bool = False):
  from jlora.run import config
  return config.from_dict({
      "run_dir": run_dir, "model": {"path": model, "remat": False},
      "lora": {"rank": 16}, "train": {"steps": steps, "method": method, "lr": 1e-5,
                                      "checkpoint_every": 1000},
      "data": {"source": "task:arithmetic_pairs", "system": "Be brief.", "seq_len": seq_len,
               "batch_size": pairs, "prefetch": 0},
      "eval": {"examples": 0, "batches": 1 if evaluate else 0}, "dpo": {"loss": loss}},
      objective="dpo")


def speed(pairs: int, seq_len: int, steps: int, model: str) -> dict:
  import jax
  from jlora.data import pairs as pairs_lib
  from jlora.infra import mesh as mesh_lib
  from jlora.objectives import dpo
  from jlora.run import build, train_step
  cfg = _config(model, tempfile.mkdtemp(), steps, pairs=pairs, seq_len=seq_len)
  s = build.build(cfg, build.preflight(cfg, dpo.DPO.rules), log=lambda _: None)
  objective = dpo.objective(s)
  frozen = objective.frozen
  trainable = s.trainable

  def fresh_state():
    return jax.tree_util.tree_map(jax.numpy.copy, trainable)

  step_in, state_in = train_step.build(objective.loss, s.tx, fresh_state(), frozen, s.mesh)
  step_cached, state_cached = train_step.build(objective.loss, s.tx, fresh_state(), frozen,
                                               s.mesh)
  ref_forward = jax.jit(mesh_lib.traced_in(
      lambda base, batch: dpo.sequence_logps(s.model, base, batch)[0], s.mesh))
  it = iter(pairs_lib.dataset(cfg.data, s.tok))
  batches = [mesh_lib.global_batch(next(it), s.mesh) for _ in range(steps + 2)]
  times = {"in_step": [], "cached": []}
  losses = {"in_step": [], "cached": []}
  for i, batch in enumerate(batches):
    start = time.perf_counter()
    state_in, m = step_in(state_in, frozen, batch)
    jax.block_until_ready(m)
    t_in = time.perf_counter() - start
    losses["in_step"].append(float(m["loss"]))
    start = time.perf_counter()
    ref = ref_forward(s.frozen, batch)
    state_cached, m = step_cached(state_cached, frozen, {**batch, "ref_logps": ref})
    jax.block_until_ready(m)
    t_cached = time.perf_counter() - start
    losses["cached"].append(float(m["loss"]))
    if i >= 2:  # the first two compile
      times["in_step"].append(t_in * 1e3)
      times["cached"].append(t_cached * 1e3)
  objective.batches.close()
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"pairs": pairs, "rows": 2 * pairs, "seq_len": seq_len, "steps_timed": steps,
          "in_step_ms": med["in_step"], "cached_ms": med["cached"],
          "cached_over_in_step": med["cached"] / med["in_step"],
          "max_loss_difference": max(abs(a - b) for a, b in zip(losses["in_step"],
                                                                losses["cached"])),
          "times_ms": times}


def one_memory(name: str, steps: int, model: str) -> dict:
  """One configuration's `jlora dpo` run, measured in this process (``memory`` runs each in
  its own)."""
  from jlora.objectives import dpo
  method, loss = MEMORY[name]
  run_dir = os.path.join(tempfile.mkdtemp(prefix="jlora_dpo_mem_"), "run")
  phases = common.PhasePeaks()
  summary = dpo.run(_config(model, run_dir, steps, method, loss, evaluate=True),
                    progress=False, log=lambda _: None, on_event=phases)
  rows = phases.finish()
  return {"config": name, "process_peak_mb": common.peak_rss_mb(),
          "loop_peak_mb": phases.peak_from("evaluation"),
          "trainable_mb": summary["trainable_bytes"] / 2**20,
          "phases": {r["phase"]: round(r["peak_rss_mb"]) for r in rows}}


def memory(steps: int, model: str) -> dict:
  rows = []
  for name in MEMORY:
    rows.append(common.call("bench.dpo", "one_memory", env=common.CPU, name=name,
                            steps=steps, model=model))
    print(json.dumps(rows[-1]), flush=True)
  by = {r["config"]: r for r in rows}
  out = {"runs": rows}
  for method in ("lora", "full"):
    added = by[f"{method}-sigmoid"]["loop_peak_mb"] - by[f"{method}-simpo"]["loop_peak_mb"]
    out[f"{method}_reference_adds_mb"] = added
    print(f"{method}: the reference adds {added:+.0f} MB to the loop's peak "
          f"({by[method + '-simpo']['loop_peak_mb']:.0f} -> "
          f"{by[method + '-sigmoid']['loop_peak_mb']:.0f} MB)", flush=True)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("what", choices=("speed", "memory", "all"))
  p.add_argument("--pairs", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=48)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--memory-steps", type=int, default=3)
  p.add_argument("--model", default="smollm2")
  p.add_argument("--json")
  args = p.parse_args(argv)
  result = common.stamped({})
  if args.what in ("speed", "all"):
    result["speed"] = common.call("bench.dpo", "speed", env=common.CPU, pairs=args.pairs,
                                  seq_len=args.seq_len, steps=args.steps, model=args.model)
    r = result["speed"]
    print(f"speed: reference in the step {r['in_step_ms']:.0f} ms/step, per batch in a "
          f"separate program {r['cached_ms']:.0f} ms/step ({r['cached_over_in_step']:.3f}x); "
          f"losses equal within {r['max_loss_difference']:.2g}", flush=True)
  if args.what in ("memory", "all"):
    result["memory"] = memory(args.memory_steps, args.model)
  common.save_json(result, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
