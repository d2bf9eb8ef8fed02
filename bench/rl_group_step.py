"""RL runs trained together against one run alone, side by side: configs/rl_arithmetic.toml's
recipe (4 prompts x 16 samples a step, 8 new tokens) as one ``jlora rl`` run, then as
``--runs`` runs in one ``jlora rl A B ...`` process (each its own ``train.seed``), each
``--steps`` steps at LoRA rank ``--rank`` with no held-out evaluation. Per step: the
step's wall (``step_s``) and its sampling (``data_s``) from each run's metrics, averaged
over steps 3 on (1 compiles; 2's training overlaps 3's sampling, which waits for it);
the group's per run = its step / ``--runs``.

    python -m bench.rl_group_step --model DIR [--runs 6] [--steps 6] [--rank 16] [--json F]

``--model``: a model that already answers (RL learns only from rewards it earns), e.g. the
rl study's ``sft_model`` or ``jlora merge runs/quickstart --out runs/quickstart_merged``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

from bench import common


def recipes(n: int, model: str, steps: int, out_dir: str) -> list[str]:
  """``n`` copies of the RL recipe (JSON, which ``jlora rl`` reads like TOML): run i with
  ``train.seed`` i, its own run_dir under out_dir."""
  from jlora.run import parsing
  base = parsing.read(os.path.join(common.ROOT, "configs/rl_arithmetic.toml"))
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i in range(n):
    values = copy.deepcopy(base)
    values["run_dir"] = os.path.join(out_dir, f"run{i}")
    values["model"]["path"] = os.path.abspath(model)
    values["train"].update(steps=steps, seed=i, checkpoint_every=steps)
    path = os.path.join(out_dir, f"run{i}.json")
    with open(path, "w") as f:
      json.dump(values, f, indent=1)
    paths.append(path)
  return paths


def _steps(run_dir: str) -> dict:
  """Mean ``step_s`` and ``data_s`` over steps 3 on, and training = their difference."""
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  rows = [r for r in rows if r.get("step", 0) >= 3 and "step_s" in r]
  if not rows:
    raise SystemExit(f"{run_dir}: no step 3 or later logged (give --steps >= 3)")
  step = sum(r["step_s"] for r in rows) / len(rows)
  data = sum(r["data_s"] for r in rows) / len(rows)
  return {"steps_timed": len(rows), "step_s": step, "sample_s": data, "train_s": step - data}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="a merged model that answers (see above)")
  p.add_argument("--runs", type=int, default=6)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--json", default=None, help="write the results here too")
  args = p.parse_args(argv)
  if not os.path.isdir(args.model):
    raise SystemExit(f"--model {args.model!r}: not a directory")
  sets = ["--set", "eval.examples=0", "--set", f"lora.rank={args.rank}", "--no-progress"]
  env = {**common.CPU, "PYTHONUNBUFFERED": "1"}
  with tempfile.TemporaryDirectory(prefix="rl-group-step-") as out:
    solo = recipes(1, args.model, args.steps, os.path.join(out, "solo"))
    common.jlora(["rl", *solo, *sets], env=env)
    alone = _steps(os.path.join(out, "solo", "run0"))
    group = recipes(args.runs, args.model, args.steps, os.path.join(out, "group"))
    common.jlora(["rl", *group, *sets], env=env)
    together = _steps(os.path.join(out, "group", "run0"))  # the group's step: every run's
  per_run = {k: v / args.runs for k, v in together.items() if k != "steps_timed"}
  result = {"machine": common.machine(devices=False), "runs": args.runs, "rank": args.rank,
            "steps": args.steps, "solo": alone, "group": together, "group_per_run": per_run,
            "ratio_per_run": {k: per_run[k] / alone[k] for k in per_run}}
  print(f"\n{common.machine_line(result['machine'])}")
  print(f"| s a step (steps 3-{args.steps}) | step | sampling | training |\n"
        "| --- | ---: | ---: | ---: |")
  for name, row in (("one run alone", alone), (f"{args.runs} runs together", together),
                    ("together, per run", per_run),
                    ("per run / alone", result["ratio_per_run"])):
    print(f"| {name} | {row['step_s']:.2f} | {row['sample_s']:.2f} | {row['train_s']:.2f} |")
  return common.save_json(result, args.json)


if __name__ == "__main__":
  main()
