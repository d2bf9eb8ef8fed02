"""Many adapters over one base: N quickstart-sized LoRA runs trained together (one
``jlora train A.json B.json ...`` process) against the same N runs one after another (N
``jlora train`` processes), as a user runs them: wall time and peak RSS, side by side.

    python -m bench.group_train [--runs 8] [--steps 15] [--out DIR] [--json FILE]

Run i is configs/quickstart.toml (SmolLM2-135M, LoRA on all layers, 4 rows x 128 tokens,
64 greedy held-out answers before and after) with its own seeds (data and adapters: i),
rank (8 or 16) and LR (the LR rule's x 0.5, 1 or 2), ``--steps`` steps and one checkpoint
at the end. Each process's RSS is sampled every 100 ms (``common.run``); the group's
phases come from its events (``--events``). The issue's bounds: the group's wall time
<= 0.8x the sequential total, its peak RSS <= 1.75x one solo run's (the largest).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bench import common

FACTORS = (0.5, 1.0, 2.0)  # on the LR rule, by run
RANKS = (8, 16)


def recipes(n: int, steps: int, out_dir: str) -> list[str]:
  """The N runs' recipes (JSON, which ``jlora train`` reads like TOML), written to out_dir."""
  from jlora import models
  from jlora.findings import hparams
  from jlora.run import config, parsing
  base = parsing.read(os.path.join(common.ROOT, "configs/quickstart.toml"))
  rule = hparams.lora_lr(models.read_config(config.model_path(config.from_dict(base))), steps)
  paths = []
  for i in range(n):
    values = json.loads(json.dumps(base))
    values["run_dir"] = os.path.join(out_dir, f"run{i}")
    values["lora"]["rank"] = RANKS[i % len(RANKS)]
    values["train"].update(steps=steps, lr=rule * FACTORS[i % len(FACTORS)], seed=i,
                           checkpoint_every=steps, log_every=5)
    values["data"]["seed"] = i
    path = os.path.join(out_dir, f"run{i}.json")
    with open(path, "w") as f:
      json.dump(values, f, indent=1)
    paths.append(path)
  return paths


def _measure(argv: list[str]) -> tuple[common.Child, float]:
  begin = time.perf_counter()
  child = common.jlora(argv, env={**common.CPU, "PYTHONUNBUFFERED": "1"}, sample_every=0.1)
  return child, time.perf_counter() - begin


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", type=int, default=8)
  p.add_argument("--steps", type=int, default=15)
  p.add_argument("--out", default=None, help="where the runs go (default: a temporary dir)")
  p.add_argument("--json", default=None, help="write the results here too")
  args = p.parse_args(argv)
  from jlora.run import events
  with tempfile.TemporaryDirectory(prefix="group-train-") as tmp:
    out = args.out or tmp
    solo_dir, group_dir = os.path.join(out, "solo"), os.path.join(out, "group")
    os.makedirs(solo_dir, exist_ok=True)
    os.makedirs(group_dir, exist_ok=True)
    solos = []
    for i, path in enumerate(recipes(args.runs, args.steps, solo_dir)):
      child, wall = _measure(["train", path, "--no-progress"])
      peak = max(s["VmRSS"] for _, s in child.samples)
      solos.append({"run": i, "wall_s": wall, "peak_rss_mb": peak})
      print(f"solo run{i}: {wall:.1f} s, peak RSS {peak:,.0f} MiB", flush=True)
    log = os.path.join(group_dir, "events.jsonl")
    paths = recipes(args.runs, args.steps, group_dir)
    child, wall = _measure(["train", *paths, "--no-progress", "--events", log])
    phases = common.phase_rows(child, events.read(log))
    peak = max(s["VmRSS"] for _, s in child.samples)
    quality = []
    for i in range(args.runs):
      got = json.load(open(os.path.join(group_dir, f"run{i}", "summary.json")))
      want = json.load(open(os.path.join(solo_dir, f"run{i}", "summary.json")))
      quality.append({k: (got[k], want[k]) for k in ("eval_loss_after", "accuracy_after")})
  sequential = sum(s["wall_s"] for s in solos)
  solo_peak = max(s["peak_rss_mb"] for s in solos)
  result = {
      "machine": common.machine(devices=False), "runs": args.runs, "steps": args.steps,
      "solo": solos, "sequential_wall_s": sequential, "group_wall_s": wall,
      "group_peak_rss_mb": peak, "group_phases": phases,
      "wall_ratio": wall / sequential, "rss_ratio": peak / solo_peak,
      "group_vs_solo_after": quality,
  }
  print(f"\n{common.machine_line(result['machine'])}")
  print(f"{args.runs} runs x {args.steps} steps: one after another {sequential:.0f} s, "
        f"together {wall:.0f} s ({result['wall_ratio']:.2f}x, bound 0.8x); peak RSS solo "
        f"{solo_peak:,.0f} MiB, together {peak:,.0f} MiB ({result['rss_ratio']:.2f}x, "
        "bound 1.75x)")
  print("| group phase | s | peak RSS MiB |\n| --- | ---: | ---: |")
  for row in phases:
    print(f"| {row['phase']} | {row['seconds']:.1f} | {row['peak_rss_mb']:,.0f} |")
  print("held-out loss / accuracy after, group vs solo: " + "; ".join(
      f"run{i} {q['eval_loss_after'][0]:.4f}/{q['eval_loss_after'][1]:.4f}, "
      f"{q['accuracy_after'][0]:.3f}/{q['accuracy_after'][1]:.3f}"
      for i, q in enumerate(quality)))
  return common.save_json(result, args.json)


if __name__ == "__main__":
  main()
