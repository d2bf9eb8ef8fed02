"""The ``lr`` study. FINDINGS 2: LoRA's optimal learning rate against full fine-tuning's."""

from __future__ import annotations

import math

from jlora.findings import hparams
from jlora.study import report, runner, verdicts
from jlora.study.registry import Context, Outcome, Study, StudyPlan, register
from jlora.study.sft import METRIC, arm, base, fmt_lr, metric


def lr_prepare(ctx: Context) -> StudyPlan:
  values, cfg = base(ctx, ctx.pick(3, 15, 200))
  steps = values["train"]["steps"]
  exponents = ctx.pick((-1, 0, 1), (-2, -1, 0, 1), (-3, -2, -1, 0, 1, 2))
  ranks = ctx.pick((4,), (4, 32), (4, 64, 256))
  arms = []
  full = hparams.full_ft_lr(cfg)
  for e in exponents:  # grids of factor 3 around each method's rule
    lr = full * 3.0 ** e
    arms.append(arm(f"full-lr{fmt_lr(lr)}", "FullFT", lr, train={"method": "full", "lr": lr}))
  for r in ranks:
    for e in exponents:
      lr = hparams.lora_lr(cfg, steps) * 3.0 ** e
      arms.append(arm(f"lora-r{r}-lr{fmt_lr(lr)}", f"LoRA r={r}", lr,
                       lora={"rank": r}, train={"method": "lora", "lr": lr}))
  return ctx.plan(values, arms)


def lr_analyse(ctx: Context, plan: StudyPlan, results) -> Outcome:
  series: dict[str, dict[int, list]] = {}  # series -> seed -> its arms
  for r in results:
    series.setdefault(r.arm.series, {}).setdefault(r.arm.seed, []).append(r)
  optima = {name: {k: verdicts.lr_optimum([r.arm.x for r in rs], [metric(r) for r in rs])
                   for k, rs in sorted(by_seed.items())} for name, by_seed in series.items()}
  full = optima.pop("FullFT", None)
  verdict = verdicts.lr_ratio(optima, full or {})
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, by_seed in series.items():
    groups = runner.by_arm([r for rs in by_seed.values() for r in rs])
    pts = sorted((g[0].arm.x, e) for g in groups.values()
                 if (e := verdicts.estimate([metric(r) for r in g])) is not None)
    color = None
    if pts:
      line = ax.errorbar([x for x, _ in pts], [e.mean for _, e in pts],
                         yerr=[e.se or 0 for _, e in pts], fmt="o-", capsize=3, label=name)
      color = line[0].get_color()
    os = full if name == "FullFT" else optima.get(name)
    if os and all(o is not None for o in os.values()):
      ax.axvline(_geomean(o.lr for o in os.values()), ls=":", lw=1, color=color or "k")
    for g in groups.values():
      if any(r.status != "done" for r in g):
        ax.plot([g[0].arm.x], [ax.get_ylim()[1]], "x", color="k")
  report.style(ax, "learning rate (constant)", "loss, last quarter of training (+-1 s.e.)",
               "LR sweep: optimum per method (dotted: fitted, geometric mean over seeds)",
               logx=10)
  plots = [report.save(fig, ctx.out, "lr.png")]

  def says(name, os):
    if not os or any(o is None for o in os.values()):
      return f"{name} -"
    logs = verdicts.estimate([math.log10(o.lr) for o in os.values()])
    spread = "" if logs.se is None else f" (x/ {10 ** logs.se:.2f} s.e.)"
    return (f"{name} {10 ** logs.mean:.3g}{spread}" +
            ("" if all(o.fitted for o in os.values()) else " (a grid point at some seed)") +
            ("" if all(o.bracketed for o in os.values()) else " (at the grid's edge)"))
  measured = ["Optimal LR (parabola in log LR through the best point and its neighbours, "
              "per seed; geometric mean over seeds): " +
              ", ".join([says("FullFT", full)] + [says(k, o) for k, o in optima.items()]) +
              "."]
  ratios = {}
  if full and all(o is not None for o in full.values()):
    for k, os in optima.items():
      if os and all(o is not None for o in os.values()):
        ratios[k] = verdicts.paired({s: math.log10(o.lr) for s, o in os.items()},
                                    {s: math.log10(o.lr) for s, o in full.items()})
    measured.append("LoRA / FullFT optimum, seed by seed: " + ", ".join(
        f"{k} {_times(e)}" for k, e in ratios.items()) + ".")
    lows = [_geomean(o.lr for o in os.values()) for os in optima.values()
            if os and all(o is not None for o in os.values())]
    if len(lows) > 1:
      measured.append(f"Across ranks the LoRA optimum moves {max(lows) / min(lows):.2f}x "
                      "(the post: < 2x between rank 4 and 512).")
    headline = "LoRA/FullFT optimal LR " + ", ".join(f"{k.split()[-1]} {_times(e)}"
                                                      for k, e in ratios.items() if e)
  else:
    headline = "no FullFT optimum"
  table = runner.summary_table(results, lambda r: {"series": r.arm.series, "lr": r.arm.x})
  return Outcome(verdict, measured, table, plots, headline)


def _geomean(values) -> float:
  values = list(values)
  return math.exp(sum(math.log(v) for v in values) / len(values))


def _times(log_ratio) -> str:
  """A ratio estimated in log10: "8.5x" or "8.5x (x/ 1.12)" (one standard error)."""
  return f"{10 ** log_ratio.mean:.1f}x" + (
      "" if log_ratio.se is None else f" (x/ {10 ** log_ratio.se:.2f})")


register(Study(
    "lr", "Finding 2: LoRA's optimal learning rate is ~10x full fine-tuning's",
    "The optimal LoRA LR is about 10x the optimal FullFT LR (15x for runs under ~100 steps), "
    "and moves less than 2x across ranks.",
    "LR sweeps over 14 Llama and Qwen models; fit M_LoRA = 9.8 x M_FullFT (the post's LR-vs-"
    "loss curves per rank).",
    f"{METRIC} Each method's optimum, per seed, is the minimum of a parabola in log10(LR) "
    "through its best grid point and both neighbours (a grid of factor 3 around the LR "
    "rule); LoRA's over FullFT's is taken seed by seed, in log10. Reproduced when, for every "
    "LoRA rank, the ratio's 2-standard-error interval lies within [5, 20] and every optimum "
    "is bracketed; not reproduced when an interval lies wholly outside; otherwise (an "
    "optimum at the grid's edge, an interval across a bound) inconclusive.",
    lr_prepare, lr_analyse))
