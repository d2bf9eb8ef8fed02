"""The ``batch`` study. FINDINGS 4: LoRA is less tolerant of large batches than full fine-tuning."""

from __future__ import annotations


from jlora.findings import hparams
from jlora.study import report, runner, verdicts
from jlora.study.registry import Context, Outcome, Study, StudyPlan, register
from jlora.study.sft import METRIC, arm, base, metric


def batch_prepare(ctx: Context) -> StudyPlan:
  sizes = ctx.pick((2, 8), (1, 4, 16), (32, 128, 512))
  rows = ctx.pick(16, 64, 16384)  # rows of data.seq_len tokens every arm sees
  values, cfg = base(ctx, 1)
  # One packing for every batch size (one row stream, first-fit over a fixed number of
  # bins), so every arm trains on the same rows in the same order; and the same held-out
  # rows for all.
  values["data"]["packing_bins"] = max(sizes)
  values["data"]["row_streams"] = 1
  held = values["eval"]["batches"] * values["data"]["batch_size"]
  held_out_rows = -(-held // max(sizes)) * max(sizes)  # a multiple of every batch size
  rank = ctx.pick(4, 16, 128)
  arms = []
  for b in sizes:
    steps = rows // b
    lora_lr = hparams.lora_lr(cfg, steps)
    train = {"steps": steps, "checkpoint_every": steps}
    same = {"data": {"batch_size": b}, "eval": {"batches": max(held_out_rows // b, 1)}}
    arms.append(arm(f"full-b{b}", "FullFT", b, **same,
                     train={**train, "method": "full", "lr": hparams.full_ft_lr(cfg)}))
    arms.append(arm(f"lora-b{b}", f"LoRA r={rank}", b, **same,
                     lora={"rank": rank}, train={**train, "method": "lora", "lr": lora_lr}))
  return ctx.plan(values, arms, rows=rows, rank=rank)


def batch_analyse(ctx: Context, plan: StudyPlan, results) -> Outcome:
  tol = 0.01
  final = {(g[0].arm.series.split()[0], int(g[0].arm.x)): runner.per_seed(g, metric)
           for g in runner.by_arm(results).values()}
  sizes = sorted({b for _, b in final})
  gap_by_seed = {b: {k: (None if v is None or final.get(("FullFT", b), {}).get(k) is None
                         else v - final[("FullFT", b)][k])
                     for k, v in final.get(("LoRA", b), {}).items()} for b in sizes}
  gaps = {b: verdicts.paired(final.get(("LoRA", b), {}), final.get(("FullFT", b), {}))
          for b in sizes}
  growth = (verdicts.paired(gap_by_seed[sizes[-1]], gap_by_seed[sizes[0]])
            if len(sizes) > 1 else None)
  verdict = verdicts.batch(gaps, growth, tol)
  plt = report.pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  for method in ("FullFT", "LoRA"):
    pts = [(s, e) for s in sizes
           if (e := verdicts.estimate(list(final.get((method, s), {}).values()))) is not None]
    if pts:
      a.errorbar([s for s, _ in pts], [e.mean for _, e in pts],
                 yerr=[e.se or 0 for _, e in pts], fmt="o-", capsize=3, label=method)
  report.style(a, "batch size (rows), equal tokens", "loss, last quarter of training (+-1 s.e.)",
               logx=2)
  pts = [(s, g) for s, g in gaps.items() if g is not None]
  if pts:
    b.errorbar([s for s, _ in pts], [g.mean for _, g in pts], yerr=[g.se or 0 for _, g in pts],
               fmt="o-", capsize=3, color="#c44")
  b.axhline(0, color="gray", lw=0.8)
  report.style(b, "batch size (rows)", "LoRA minus FullFT (nats, +-1 s.e.)", logx=2)
  plots = [report.save(fig, ctx.out, "batch.png"),
           report.curves(results, ctx.out, "training loss per batch size and method")]
  seq = plan.values["data"]["seq_len"]
  measured = [f"Every arm sees {plan.info['rows']} rows of {seq} tokens (equal tokens); "
              f"LoRA r={plan.info['rank']} at the LoRA rule, FullFT at its rule, constant LR. "
              "LoRA minus FullFT, loss over the last quarter of training, seed by seed: " +
              ", ".join(f"batch {s} {g}" for s, g in pts) +
              (f"; growth from the smallest to the largest batch {growth}." if growth else ".")]
  table = runner.summary_table(results, lambda r: {"method": r.arm.series, "batch": int(r.arm.x),
                                                   "steps": len(r.curve())})
  headline = "gap " + ", ".join(f"b{s} {g.format('+.3f')}" for s, g in pts)
  return Outcome(verdict, measured, table, plots, headline)


register(Study(
    "batch", "Finding 4: LoRA loses more to full fine-tuning at large batch sizes",
    "LoRA's gap to FullFT grows with batch size (about equal at 32, worse at 512), "
    "independently of rank; both do best at small batches.",
    "OpenThoughts3 10k-example subset, batch 32 to 512 (the post's batch-size figure).",
    verdicts.batch.__doc__.replace("\n  ", " ").strip() + f" {METRIC} Tolerance 0.01 nats; "
    "every arm trains on the same number of tokens, each method at its LR rule.",
    batch_prepare, batch_analyse))
