"""The ``layers`` study. FINDINGS 1: LoRA on which layers (attention, MLP, all) at equal
parameters."""

from __future__ import annotations

import math

from jlora.findings import hparams
from jlora.study import report, runner, verdicts
from jlora.study.registry import Context, Outcome, Study, StudyPlan, register
from jlora.study.sft import METRIC, arm, base, best_arm, fmt_lr, metric


def group_params(model_cfg, rank: int, targets: str) -> int:
  from jlora.findings import advisor
  return advisor.plan_for(model_cfg, rank, targets, alpha=32.0).adapter_params


def layers_prepare(ctx: Context) -> StudyPlan:
  values, cfg = base(ctx, ctx.pick(4, 40, 400))
  mlp_rank = ctx.pick(4, 16, 128)
  mlp_params = group_params(cfg, mlp_rank, "mlp")
  per_rank = group_params(cfg, 1, "attn")
  attn_rank = 2 ** math.ceil(math.log2(max(mlp_params / per_rank, 1)))  # >= MLP's params
  factors = ctx.pick((1.0,), (0.5, 1.0), (0.5, 1.0, 2.0))  # LRs per condition: best kept
  lr = hparams.lora_lr(cfg, values["train"]["steps"])
  arms = []
  for targets, r in (("attn", attn_rank), ("mlp", mlp_rank), ("all", mlp_rank)):
    for f in factors:
      arms.append(arm(f"{targets}-r{r}-lr{fmt_lr(lr * f)}", targets, lr * f,
                       lora={"rank": r, "targets": targets},
                       train={"method": "lora", "lr": lr * f}))
  params = {t: group_params(cfg, r, t) for t, r in
            (("attn", attn_rank), ("mlp", mlp_rank), ("all", mlp_rank))}
  return ctx.plan(values, arms, ranks={"attn": attn_rank, "mlp": mlp_rank, "all": mlp_rank},
                  params=params, factors=factors)


def layers_analyse(ctx: Context, plan: StudyPlan, results) -> Outcome:
  tol = 0.01
  series: dict[str, list] = {}
  for r in results:
    series.setdefault(r.arm.series, []).append(r)
  best = {s: best_arm(rs) for s, rs in series.items()}
  values = {s: runner.per_seed(b, metric) for s, b in best.items() if b}
  loss = {s: verdicts.estimate(list(v.values())) for s, v in values.items()}
  pair = lambda a, b: (verdicts.paired(values[a], values[b])  # noqa: E731
                       if a in values and b in values else None)
  verdict = verdicts.layers(pair("attn", "mlp"), pair("mlp", "all"), tol)
  ranks, params = plan.info["ranks"], plan.info["params"]
  table = runner.summary_table(results, lambda r: {
      "targets": r.arm.series, "rank": ranks[r.arm.series],
      "adapter params": params[r.arm.series], "lr": r.arm.x})
  plt = report.pyplot()
  fig, (ax, dx) = plt.subplots(1, 2, figsize=(10, 3.8))
  names = [s for s in ("attn", "mlp", "all") if loss.get(s) is not None]
  ax.bar(names, [loss[s].mean for s in names], color=["#c44", "#48c", "#4a4"][:len(names)])
  for i, s in enumerate(names):
    count = f"{params[s] / 1e6:.2f}M" if params[s] >= 1e5 else f"{params[s]:,}"
    ax.text(i, loss[s].mean, f"r={ranks[s]}\n{count} params", ha="center", va="bottom",
            fontsize=8)
  if names:
    low = min(loss[s].mean for s in names)
    ax.set_ylim(low - 0.05 * abs(low), max(loss[s].mean for s in names) + 0.04 * abs(low))
  report.style(ax, "LoRA targets", "loss, last quarter of training (mean over seeds)",
               "attention-only vs MLP-only vs all layers", legend=False)
  report.differences(dx, {"attn - mlp": pair("attn", "mlp"), "mlp - all": pair("mlp", "all")},
                     tol, "nats")
  plots = [report.save(fig, ctx.out, "layers.png"),
           report.curves([r for b in best.values() if b for r in b], ctx.out,
                         "training loss by target set (each at its best LR)")]
  measured = [f"Loss over the last quarter of {plan.values['train']['steps']} steps (each "
              "batch scored before it is trained on), best of the LRs tried per condition "
              "(the LoRA rule x " + ", ".join(f"{f:g}" for f in plan.info["factors"]) +
              ", by the mean over seeds): " + ", ".join(
                  f"{s} r={ranks[s]} ({params[s]:,} params) {loss[s].format('.4f')}"
                  for s in names) + "."]
  gap, diff = pair("attn", "mlp"), pair("mlp", "all")
  headline = (f"attn - mlp {gap.format('+.3f')}, mlp - all {diff.format('+.3f')} nats"
              if gap and diff else ", ".join(f"{s} {loss[s].format('.3f')}" for s in names))
  return Outcome(verdict, measured, table, plots, headline)


register(Study(
    "layers", "Finding 1: which layers to adapt",
    "LoRA on the MLP alone is about as good as LoRA everywhere; attention-only LoRA is "
    "clearly worse, even with as many parameters.",
    "Llama-3.1-8B: attention-only r=256 (0.25B params) loses to MLP-only r=128 (0.24B); "
    "MLP-only ~= all layers (the post's layer-comparison figure).",
    verdicts.layers.__doc__.split("\n\n")[0].replace("\n  ", " ").strip() + f" {METRIC} "
    "Best of the LRs tried per condition (by the mean over seeds); tolerance 0.01 nats; "
    "attention-only gets the smallest power-of-two rank with at least MLP-only's "
    "parameters.",
    layers_prepare, layers_analyse))
