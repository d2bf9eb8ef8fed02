"""A study's LoRA arms trained as one group (what ``jlora study`` does) against the same
arms one after another (what it did before), side by side in one process: the wall time of
each and their ratio, and each arm's held-out loss both ways (a group's run is its solo
run up to float rounding).

    python -m bench.study_group [--study rank] [--budget small] [--seeds 1] [--json FILE]

The arms are the study's own (``prepare`` at the budget: the rank study at ``small`` is
SmolLM2-135M-Instruct, ranks 1, 4, 16, 64, 40 steps), trained through
``jlora.study.runner.run_arms`` into two fresh directories: ``together=False`` first, then
grouped. Each timing covers loading the base once, training, held-out evaluations and
checkpoints; the study's analysis and plots are not run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench.common import save_json, stamped
from jlora import study as study_lib
from jlora.study import registry, runner


def measure(name: str, budget: str, seeds: int) -> dict:
  study_lib._load_all()
  study = registry.STUDIES[name]
  out: dict = {"study": name, "budget": budget, "seeds": seeds}
  with tempfile.TemporaryDirectory() as tmp:
    for mode, together in (("one_after_another", False), ("grouped", True)):
      ctx = registry.Context(name, budget, os.path.join(tmp, mode), seeds=seeds,
                             log=lambda _: None)
      os.makedirs(ctx.out)
      plan = study.prepare(ctx)
      arms = runner.seeded(plan.arms, plan.values, seeds)
      start = time.perf_counter()
      results = runner.run_arms(name, arms, plan.values, ctx.out, log=lambda _: None,
                                together=together)
      out[f"{mode}_s"] = time.perf_counter() - start
      out[f"{mode}_eval_loss"] = {r.arm.name: r.final() for r in results}
  out["arms"] = list(out["grouped_eval_loss"])
  out["ratio"] = out["grouped_s"] / out["one_after_another_s"]
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--study", default="rank")
  p.add_argument("--budget", default="small")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  result = measure(args.study, args.budget, args.seeds)
  stamped(result)
  print(f"{args.study} study at {args.budget}, {len(result['arms'])} LoRA arms "
        f"({args.seeds} seed(s)): one after another {result['one_after_another_s']:.0f} s, "
        f"grouped {result['grouped_s']:.0f} s: {result['ratio']:.2f}x the wall time")
  for arm in result["arms"]:
    print(f"  {arm}: held-out loss alone {result['one_after_another_eval_loss'][arm]:.4f}, "
          f"grouped {result['grouped_eval_loss'][arm]:.4f}")
  return save_json(result, args.json)


if __name__ == "__main__":
  main()
