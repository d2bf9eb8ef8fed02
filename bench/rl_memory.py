"""Peak memory of `jlora rl`: LoRA vs full fine-tuning, with and without the KL reference.

    python -m bench.rl_memory [--steps 3] [--model DIR]

Each configuration is one `jlora rl` run (``rl.run``, the CLI's code path) in its own
process on SmolLM2-135M-Instruct (f32, remat off, 4 prompts x 4 completions x 8 new tokens
a step, no held-out evaluation). ``kl`` = ``rl.track_kl`` on and ``rl.kl_coef = 0.05``:
the step computes the reference policy's log-probs. Under LoRA the reference is the base
with adapters off, i.e. the frozen weights already in memory; under full fine-tuning it
must be a copy of the initial weights (~540 MB f32 for SmolLM2). Reported per run: the
process's peak RSS (ru_maxrss, model load included) and the peak from the first
evaluation on (VmHWM reset when the loop starts: sampling, rewards, reference forward,
the update).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench.memory import _phase_peak_mb, _release_freed_heap, _reset_peak, _rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"lora": ("lora", False), "lora-kl": ("lora", True), "full": ("full", False),
           "full-kl": ("full", True)}


def one(name: str, steps: int, model: str) -> dict:
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

  def on_event(event) -> None:
    if event.kind == "phase" and event.name == "evaluation":  # set-up done: the loop starts
      _release_freed_heap()
      on_event.loaded = _rss_mb(), _phase_peak_mb()
      _reset_peak()
  summary = rl.run(cfg, progress=False, log=lambda _: None, on_event=on_event)
  return {"config": name, "process_peak_mb": _rss_mb(), "loop_peak_mb": _phase_peak_mb(),
          "trainable_mb": summary["trainable_bytes"] / 2**20,
          "optimizer_mb": summary["optimizer_bytes"] / 2**20}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--model", default="smollm2")
  p.add_argument("--one", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    print("RESULT " + json.dumps(one(args.one, args.steps, args.model)))
    return 0
  rows = []
  for name in CONFIGS:
    out = subprocess.run([sys.executable, "-m", "bench.rl_memory", "--one", name, "--steps",
                          str(args.steps), "--model", args.model], cwd=ROOT,
                         capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
      raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    rows.append(json.loads(lines[-1][7:]))
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
