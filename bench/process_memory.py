"""Memory of the job a user runs: the whole process of ``jlora train`` (LoRA and full
fine-tuning on the quickstart) and of the same task in PEFT, phase by phase.

    python -m bench.process_memory [--steps 4] [--only jlora-lora jlora-full peft-lora]

Each run is a child process whose RSS is sampled from /proc/PID/status every 50 ms
(VmRSS; RssAnon: the process's own memory; RssFile: mapped files, e.g. the GGUF, counted
apart), while the events it writes (``--events FILE``, ``jlora.run.events``) mark the
phases: start (imports, data statistics), load, set-up (adapters, advisor), evaluation
before training, compilation of the train step, the steps (a checkpoint at step 2:
``train.checkpoint_every=2``), final evaluation and its checkpoint, finish. The
isolated-step figures are ``bench.memory``'s.

Load check: the anonymous RSS added while the model loads over the weights' bytes as
trained (f32 here), which the issue bounds by 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {  # name -> (command, config)
    "jlora-lora": ("jlora", "configs/quickstart.toml"),
    "jlora-full": ("jlora", "configs/quickstart_full.toml"),
    "peft-lora": ("peft", "configs/quickstart.toml"),
}


def _status(pid: int) -> dict | None:
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
          out[key] = int(value.split()[0]) / 1024
  except (FileNotFoundError, ProcessLookupError):
    return None
  return out or None


def sample(cmd: list[str], env: dict) -> tuple[list, list, int, float]:
  """Run ``cmd``: ([(t, status)], [output lines], exit code, its start on the monotonic
  clock)."""
  begin = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []

  def read():
    for line in proc.stdout:
      lines.append(line.rstrip())
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  samples = []
  while proc.poll() is None:
    status = _status(proc.pid)
    if status:
      samples.append((time.monotonic() - begin, status))
    time.sleep(0.05)
  reader.join(timeout=5)
  return samples, lines, proc.returncode, begin


def phases(samples, marks: list) -> list[dict]:
  """Per phase: its seconds and peak RSS (total, anonymous) from the samples; ``marks``:
  [(start time, phase)] from the child's events, "start" at 0."""
  marks = [(0.0, "start")] + marks + [(float("inf"), None)]
  out = []
  for (t0, name), (t1, _) in zip(marks, marks[1:]):
    inside = [s for t, s in samples if t0 <= t < t1]
    if inside:
      out.append({"phase": name, "seconds": (min(t1, samples[-1][0]) - t0),
                  "peak_rss_mb": max(s["VmRSS"] for s in inside),
                  "peak_anon_mb": max(s["RssAnon"] for s in inside),
                  "anon_at_start_mb": inside[0]["RssAnon"]})
  return out


def weight_mb(config: str) -> float:
  """Bytes of the model's parameters in f32 (what the quickstart trains against)."""
  import numpy as np
  from jlora import models
  from jlora.run import config as config_lib
  cfg = config_lib.load(os.path.join(ROOT, config))
  model = models.Transformer(models.read_config(config_lib.model_path(cfg)))
  return sum(int(np.prod(s)) * 4 for s in models.param_shapes(model).values()) / 2**20


def run(name: str, steps: int, out_dir: str) -> dict:
  from jlora.run import events
  kind, config = RUNS[name]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
  log = os.path.join(out_dir, f"{name}.events.jsonl")
  if kind == "jlora":
    cmd = [sys.executable, "-m", "jlora.cli", "train", config, "--no-progress",
           "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=2",
           "--set", f"run_dir={os.path.join(out_dir, name)}", "--events", log]
  else:
    cmd = [sys.executable, "-m", "bench.peft_quickstart", "--steps", str(steps),
           "--config", config, "--events", log]
  samples, lines, code, begin = sample(cmd, env)
  if code:
    raise SystemExit(f"{name} failed ({code}):\n" + "\n".join(lines[-30:]))
  parts = phases(samples, [(e.time - begin, e.name) for e in events.read(log)
                           if e.kind == "phase"])
  peak = max(s["VmRSS"] for _, s in samples)
  load = next((p for p in parts if p["phase"] == "load"), None)
  return {"name": name, "peak_rss_mb": peak, "phases": parts,
          "load_anon_growth_mb": load and load["peak_anon_mb"] - load["anon_at_start_mb"],
          "last_lines": lines[-2:]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--only", nargs="*", choices=tuple(RUNS), default=list(RUNS))
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)
  from bench.common import machine
  weights = weight_mb(RUNS["jlora-lora"][1])
  print(f"# whole-process memory, {machine()}; {args.steps} steps; f32 weights "
        f"{weights:.0f} MB")
  results = {}
  with tempfile.TemporaryDirectory() as out_dir:
    for name in args.only:
      r = results[name] = run(name, args.steps, out_dir)
      print(f"\n{name}: peak RSS {r['peak_rss_mb']:.0f} MB")
      print(f"  {'phase':<31} {'s':>6} {'peak RSS':>9} {'peak anon':>10}")
      for p in r["phases"]:
        print(f"  {p['phase']:<31} {p['seconds']:6.1f} {p['peak_rss_mb']:9.0f} "
              f"{p['peak_anon_mb']:10.0f}")
      if r["load_anon_growth_mb"] is not None:
        print(f"  load: anonymous RSS +{r['load_anon_growth_mb']:.0f} MB = "
              f"{r['load_anon_growth_mb'] / weights:.2f}x the weights (target <= 1.3)")
  lora, full = results.get("jlora-lora"), results.get("jlora-full")
  if lora and full:
    print(f"\njlora LoRA / full FT whole-process peak: "
          f"{lora['peak_rss_mb'] / full['peak_rss_mb']:.3f} (target <= 0.55); LoRA "
          f"{lora['peak_rss_mb'] / 1024:.2f} GB (target <= 2.0)")
  if lora and "peft-lora" in results:
    print(f"jlora LoRA / PEFT LoRA whole-process peak: "
          f"{lora['peak_rss_mb'] / results['peft-lora']['peak_rss_mb']:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine(), "steps": args.steps, "weights_mb": weights,
                 "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
