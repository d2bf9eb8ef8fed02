"""Memory of the job a user runs: the whole process of ``jlora train`` (LoRA and full
fine-tuning on the quickstart) and of the same task in PEFT, phase by phase.

    python -m bench.process_memory [--steps 4] [--only jlora-lora jlora-full peft-lora]

Each run is a child process whose RSS is sampled from /proc/PID/status every 50 ms
(``common.run``; VmRSS; RssAnon: the process's own memory; RssFile: mapped files, e.g. the
GGUF, counted apart), while the events it writes (``--events FILE``, ``jlora.run.events``)
mark the phases (``common.phase_rows``): start (imports, data statistics), load, set-up
(adapters, advisor), evaluation before training, compilation of the train step, the steps
(a checkpoint at step 2: ``train.checkpoint_every=2``), final evaluation and its
checkpoint, finish. The isolated-step figures are ``bench.memory``'s.

Load check: the anonymous RSS added while the model loads over the weights' bytes as
trained (f32 here), which the issue bounds by 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from bench import common

RUNS = {  # name -> (command, config)
    "jlora-lora": ("jlora", "configs/quickstart.toml"),
    "jlora-full": ("jlora", "configs/quickstart_full.toml"),
    "peft-lora": ("peft", "configs/quickstart.toml"),
}


def weight_mb(config: str) -> float:
  """Bytes of the model's parameters in f32 (what the quickstart trains against)."""
  import numpy as np
  from jlora import models
  from jlora.run import config as config_lib
  cfg = config_lib.load(os.path.join(common.ROOT, config))
  model = models.Transformer(models.read_config(config_lib.model_path(cfg)))
  return sum(int(np.prod(s)) * 4 for s in models.param_shapes(model).values()) / 2**20


def run(name: str, steps: int, out_dir: str) -> dict:
  from jlora.run import events
  kind, config = RUNS[name]
  log = os.path.join(out_dir, f"{name}.events.jsonl")
  watch = {"env": {**common.CPU, "PYTHONUNBUFFERED": "1"}, "sample_every": 0.05}
  if kind == "jlora":
    child = common.jlora(["train", config, "--no-progress", "--set", f"train.steps={steps}",
                          "--set", "train.checkpoint_every=2", "--set",
                          f"run_dir={os.path.join(out_dir, name)}", "--events", log], **watch)
  else:
    child = common.run("bench.peft_quickstart", "main", **watch,
                       argv=["--steps", str(steps), "--config", config, "--events", log])
  parts = common.phase_rows(child, events.read(log))
  peak = max(s["VmRSS"] for _, s in child.samples)
  load = next((p for p in parts if p["phase"] == "load"), None)
  return {"name": name, "peak_rss_mb": peak, "phases": parts,
          "load_anon_growth_mb": load and load["peak_anon_mb"] - load["anon_at_start_mb"],
          "last_lines": child.output[-2:]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--only", nargs="*", choices=tuple(RUNS), default=list(RUNS))
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)
  weights = weight_mb(RUNS["jlora-lora"][1])
  machine = common.machine(devices=False)
  print(f"# whole-process memory, {common.machine_line(machine)}; JAX on the CPU; "
        f"{args.steps} steps; f32 weights {weights:.0f} MB")
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
      json.dump({"machine": machine, "steps": args.steps, "weights_mb": weights,
                 "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
