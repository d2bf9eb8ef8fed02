"""Reward curves and held-out accuracy of `jlora rl` runs, side by side (FINDINGS 6).

    python -m bench.rl_curves RUN_DIR [RUN_DIR ...] --out bench/rl_finding6.png

Reads each run's metrics.jsonl (row 0: held-out accuracy before training; rows 1..: the
sampled episodes' mean reward per step, and the held-out accuracy after the last step) and
config.json (method, rank, lr); plots the reward per step (and its 4-step moving average)
and prints a table: run, method, rank, lr, held-out accuracy before -> after, mean reward
over the first and the last quarter of the steps.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def load(run_dir: str) -> dict:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  with open(os.path.join(run_dir, "config.json")) as f:
    cfg = json.load(f)
  steps = [r for r in rows if r["step"] > 0 and "reward_mean" in r]
  method = cfg["train"]["method"]
  label = "full FT" if method == "full" else f"LoRA r={cfg['lora']['rank']}"
  lr = steps[0]["lr"] if steps else cfg["train"]["lr"]
  return {"name": os.path.basename(run_dir.rstrip("/")), "label": f"{label}, lr {lr:.2g}",
          "rewards": np.asarray([r["reward_mean"] for r in steps]),
          "before": rows[0].get("accuracy"),
          "after": next((r["accuracy"] for r in reversed(rows) if r["step"] > 0 and
                         "accuracy" in r), None),
          "kl": [r.get("kl") for r in steps]}


def _pct(x) -> str:
  return "stopped" if x is None else f"{x:.1%}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("runs", nargs="+")
  p.add_argument("--out", default="bench/rl_finding6.png")
  args = p.parse_args(argv)
  runs = [load(r) for r in args.runs]
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for run in runs:
    r = run["rewards"]
    line, = ax.plot(np.arange(1, len(r) + 1), r, alpha=0.3)
    k = min(4, len(r))
    smooth = np.convolve(r, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(k, len(r) + 1), smooth, color=line.get_color(),
            label=f"{run['label']}: held-out {_pct(run['before'])} -> {_pct(run['after'])}")
  ax.set_xlabel("step")
  ax.set_ylabel("mean reward of the sampled episodes")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print("| run | held-out before | after | reward, first quarter | last quarter |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for run in runs:
    r, q = run["rewards"], max(len(run["rewards"]) // 4, 1)
    print(f"| {run['label']} ({run['name']}) | {_pct(run['before'])} | {_pct(run['after'])} | "
          f"{r[:q].mean():.3f} | {r[-q:].mean():.3f} |")
  print(f"plot: {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
