"""The ``rank`` study. FINDINGS 3: rank changes little with alpha/r and alpha = 32."""

from __future__ import annotations

import re

from jlora.findings import hparams
from jlora.study import report, runner, verdicts
from jlora.study.registry import Context, Outcome, Study, StudyPlan, register
from jlora.study.sft import METRIC, arm, base, metric


def rank_prepare(ctx: Context) -> StudyPlan:
  values, cfg = base(ctx, ctx.pick(6, 40, 500))
  lr = hparams.lora_lr(cfg, values["train"]["steps"])
  ranks = ctx.pick((1, 4), (1, 4, 16, 64), (1, 4, 16, 64, 256))
  arms = [arm(f"r{r}", f"r={r}", r, lora={"rank": r}, train={"method": "lora", "lr": lr})
          for r in ranks]
  return ctx.plan(values, arms, lr=lr)


def rank_analyse(ctx: Context, plan: StudyPlan, results) -> Outcome:
  steps = plan.values["train"]["steps"]
  early = max(2, steps // 4)
  rel_tol, tol = 0.02, 0.01
  curves = {int(r.arm.x): r.curve() for r in results if r.status == "done"}
  final = {int(r.arm.x): metric(r) for r in results}
  verdict = verdicts.rank(curves, final, early, rel_tol, tol)
  plt = report.pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  for r in results:
    if r.curve():
      a.plot(*zip(*r.curve()), lw=1.2, label=r.arm.series)
  a.axvline(early, ls=":", color="gray")
  report.style(a, "step (log)", "training loss (same batches for every rank)",
               f"rank sweep at one LR ({plan.info['lr']:.3g}); dotted: early window", logx=10)
  pts = sorted((k, v) for k, v in final.items() if v is not None)
  if pts:
    b.plot(*zip(*pts), "o-")
  report.style(b, "rank", "loss, last quarter of training", logx=2)
  plots = [report.save(fig, ctx.out, "rank.png")]
  measured = [f"{len(results)} ranks at LR {plan.info['lr']:.3g} (the LoRA rule), alpha 32, "
              f"{steps} steps; loss over the last quarter: " +
              ", ".join(f"r={k} {v:.4f}" for k, v in pts) + "."]
  table = runner.summary_table(results, lambda r: {"rank": int(r.arm.x)})
  notes = []
  order = [v for _, v in pts]
  if any(b > a for a, b in zip(order, order[1:])):
    worst = max(pts, key=lambda p: p[1])[0]
    notes.append(f"The losses are not monotone in rank (r={worst} ends worst): one seed and "
                 "one LR, so late single-batch spikes (visible in the curves) move a rank's "
                 "number by more than the ranks differ; more steps or seeds would separate "
                 "them.")
  spread = re.search(r"spread \(steps [^)]*\) ([\d.]+%)", verdict.reason)
  drop = re.search(r"(rank \d+ minus rank \d+: [+-][\d.]+)", verdict.reason)
  headline = (f"early spread {spread.group(1)}; {drop.group(1)} nats" if spread and drop
              else verdict.reason)
  return Outcome(verdict, measured, table, plots, headline, notes)


register(Study(
    "rank", "Finding 3: with alpha/r, all ranks learn alike at first",
    "With the 1/r scaling and alpha = 32 the loss curves of all ranks coincide early in "
    "training; low ranks fall off later, at a step count that grows with rank.",
    "The post's learning curves per rank at the best LR (ranks 1-512 on Tulu3 / "
    "OpenThoughts3): early curves overlap.",
    f"{METRIC} Coincide early: over steps 2..steps/4 the spread of training loss across "
    "ranks, (max - min) / mean, stays within 2%. Fall off: the lowest rank's loss is above "
    "the highest rank's by more than 0.01 nats. Reproduced: both; not reproduced: no early "
    "coincidence, or the highest rank ends worse by more than 0.01; inconclusive: "
    "they coincide but no rank falls off within the budget.",
    rank_prepare, rank_analyse))
