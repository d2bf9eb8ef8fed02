"""Peak memory of `jlora rl`: LoRA vs full fine-tuning, with and without the KL reference.

    python -m bench.rl_memory [--steps 3] [--model DIR]

Each configuration is one `jlora rl` run (``rl.run``, the CLI's code path) in its own
process on SmolLM2-135M-Instruct (f32, remat off, 4 prompts x 4 completions x 8 new tokens
a step, no held-out evaluation). ``kl`` = ``rl.track_kl`` on and ``rl.kl_coef = 0.05``:
the step computes the reference policy's log-probs. Under LoRA the reference is the base
with adapters off, i.e. the frozen weights already in memory; under full fine-tuning it
must be a copy of the initial weights (~540 MB f32 for SmolLM2). Reported per run: the
process's peak RSS (model load included), the peak from the first evaluation on
(sampling, rewards, reference forward, the update) and each phase's own peak
(``common.PhasePeaks``: freed heap released and VmHWM reset as each phase starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from bench import common

CONFIGS = {"lora": ("lora", False), "lora-kl": ("lora", True), "full": ("full", False),
           "full-kl": ("full", True)}


def one(name: str, steps: int, model: str) -> dict:
  """One configuration's `jlora rl` run, measured in this process (``main`` runs each in
  its own)."""
  from jlora.objectives import rl
  from jlora.run import config
  method, kl = CONFIGS[name]
  run_dir = os.path.join(tempfile.mkdtemp(prefix="jlora_rl_mem_"), "run")
  cfg = config.from_dict({
      "run_dir": run_dir, "model": {"path": model, "remat": False},
      "data": {"source": "task:arithmetic"},
      "train": {"steps": steps, "method": method, "checkpoint_every": 1000},
      "eval": {"examples": 0},
      "rl": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 8, "track_kl": kl,
             "kl_coef": 0.05 if kl else 0.0}})
  phases = common.PhasePeaks()
  summary = rl.run(cfg, progress=False, log=lambda _: None, on_event=phases)
  rows = phases.finish()
  return {"config": name, "process_peak_mb": common.peak_rss_mb(),
          "loop_peak_mb": phases.peak_from("evaluation"),
          "trainable_mb": summary["trainable_bytes"] / 2**20,
          "optimizer_mb": summary["optimizer_bytes"] / 2**20,
          "phases": {r["phase"]: round(r["peak_rss_mb"]) for r in rows}}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--model", default="smollm2")
  args = p.parse_args(argv)
  print(f"# machine: {common.machine_line(common.machine(devices=False))}; JAX on the CPU",
        flush=True)
  rows = []
  for name in CONFIGS:
    rows.append(common.call("bench.rl_memory", "one", env=common.CPU, name=name,
                            steps=args.steps, model=args.model))
    print(json.dumps(rows[-1]), flush=True)
  by = {r["config"]: r for r in rows}
  for method in ("lora", "full"):
    print(f"{method}: the KL reference adds "
          f"{by[method + '-kl']['loop_peak_mb'] - by[method]['loop_peak_mb']:+.0f} MB to the "
          f"loop's peak ({by[method]['loop_peak_mb']:.0f} -> "
          f"{by[method + '-kl']['loop_peak_mb']:.0f} MB)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
