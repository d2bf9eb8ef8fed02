"""The supervised studies: ``layers`` (FINDINGS 1), ``lr`` (2), ``rank`` (3), ``batch`` (4).

The post's protocol at the budget's scale: constant LR, no warm-up, one pass over the data
(a text corpus never repeats within an arm), held-out log-loss as the metric, alpha = 32.
The metric is the loss over the last quarter of the steps: each batch is scored before
the model trains on it, so it is held-out (progressive validation), averaged over a
quarter of the run instead of one noisy evaluation of the last step's weights at batch 4
(a single late spike decided the first layers run here); the final weights' loss on the
held-out split is in every table too.
Every arm reads the same base config, so the same batches in the same order (one data
seed) and the same held-out batches; they differ only in what the arm overrides.

Data: ``smoke`` trains the tiny random model on ``task:arithmetic``; ``small`` and ``full``
train on the ``fortunes`` corpus (real English text from Debian, fetched once), split into
training and held-out documents by a hash of each document (``assets.text_split``).
``--set data.source=... eval.source=...`` studies other data.
"""

from __future__ import annotations

import math
import os
import re

from jlora import models
from jlora.findings import hparams
from jlora.run import config as config_lib
from jlora.study import assets, report, runner
from jlora.study.registry import Context, Outcome, StudyPlan, Study, register
from jlora.study import verdicts


METRIC = "Loss: the last quarter of training (each batch scored before it is trained on)."


def model_path(ctx: Context) -> str:
  if ctx.model:
    return ctx.model
  if ctx.budget == "smoke":
    return assets.tiny_model(os.path.join(ctx.out, "model"))
  return config_lib.SMOLLM2


def model_config(path: str):
  return models.read_config(path)  # the smollm2 alias and Hub ids resolve there


def base_values(ctx: Context, steps: int) -> dict:
  """The base run config of an SFT study at ``ctx.budget`` (arms override parts)."""
  path = model_path(ctx)
  if ctx.budget == "smoke":
    data = {"source": "task:arithmetic", "chat": False, "size": 4000, "seq_len": 32,
            "batch_size": 4}
    held_out = {"batches": 2}
  else:
    train, test = assets.text_split("fortunes", os.path.join(ctx.out, "data"))
    data = {"source": train, "seq_len": ctx.pick(32, 64, 512),
            "batch_size": ctx.pick(4, 4, 32)}
    held_out = {"source": test, "batches": ctx.pick(2, 4, 32)}
  return {
      "model": {"path": path, "remat": ctx.budget == "full"},
      "lora": {"alpha": 32.0},
      "train": {"steps": steps, "schedule": "constant", "warmup_steps": 0, "log_every": 1,
                "checkpoint_every": steps, "keep": 1, "seed": 0},
      "data": {**data, "seed": 0, "prefetch": 0},
      "eval": {**held_out, "examples": 0, "every": 0},
  }


def _base(ctx: Context, steps: int):
  """(base values, the model's config) of an SFT study."""
  values = base_values(ctx, steps)
  return values, model_config(values["model"]["path"])


def _arm(name: str, series: str, x, **sections) -> runner.Arm:
  return runner.Arm(name, series, x, sections)


def _fmt_lr(lr: float) -> str:
  return f"{lr:.2g}".replace("e-0", "e-")


# --- layers (FINDINGS 1) -----------------------------------------------------------------

def _group_params(model_cfg, rank: int, targets: str) -> int:
  from jlora.findings import advisor
  return advisor.plan_for(model_cfg, rank, targets, alpha=32.0).adapter_params


def layers_prepare(ctx: Context) -> StudyPlan:
  values, cfg = _base(ctx, ctx.pick(4, 40, 400))
  mlp_rank = ctx.pick(4, 16, 128)
  mlp_params = _group_params(cfg, mlp_rank, "mlp")
  per_rank = _group_params(cfg, 1, "attn")
  attn_rank = 2 ** math.ceil(math.log2(max(mlp_params / per_rank, 1)))  # >= MLP's params
  factors = ctx.pick((1.0,), (0.5, 1.0), (0.5, 1.0, 2.0))  # LRs per condition: best kept
  lr = hparams.lora_lr(cfg, values["train"]["steps"])
  arms = []
  for targets, r in (("attn", attn_rank), ("mlp", mlp_rank), ("all", mlp_rank)):
    for f in factors:
      arms.append(_arm(f"{targets}-r{r}-lr{_fmt_lr(lr * f)}", targets, lr * f,
                       lora={"rank": r, "targets": targets},
                       train={"method": "lora", "lr": lr * f}))
  params = {t: _group_params(cfg, r, t) for t, r in
            (("attn", attn_rank), ("mlp", mlp_rank), ("all", mlp_rank))}
  return ctx.plan(values, arms, ranks={"attn": attn_rank, "mlp": mlp_rank, "all": mlp_rank},
                  params=params, factors=factors)


def metric(r: runner.ArmResult) -> float | None:
  """What the SFT studies compare: ``late_loss`` (held-out by construction, see there);
  the evaluation of the final weights on the held-out split is reported beside it."""
  value = r.late_loss()
  return value if value is not None and math.isfinite(value) else None


def _best(results) -> runner.ArmResult | None:
  """The arm with the lowest loss (the post's minimum over LRs)."""
  done = [r for r in results if metric(r) is not None]
  return min(done, key=metric) if done else None


def layers_analyse(ctx: Context, plan: StudyPlan, results) -> Outcome:
  tol = 0.01
  best = {s: _best(rs) for s, rs in runner.by_series(results).items()}
  loss = {s: (metric(b) if b else None) for s, b in best.items()}
  verdict = verdicts.layers(loss.get("attn"), loss.get("mlp"), loss.get("all"), tol)
  ranks, params = plan.info["ranks"], plan.info["params"]
  table = runner.summary_table(results, lambda r: {
      "targets": r.arm.series, "rank": ranks[r.arm.series],
      "adapter params": params[r.arm.series], "lr": r.arm.x})
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.8))
  names = [s for s in ("attn", "mlp", "all") if loss.get(s) is not None]
  ax.bar(names, [loss[s] for s in names], color=["#c44", "#48c", "#4a4"][:len(names)])
  for i, s in enumerate(names):
    count = f"{params[s] / 1e6:.2f}M" if params[s] >= 1e5 else f"{params[s]:,}"
    ax.text(i, loss[s], f"r={ranks[s]}\n{count} params", ha="center", va="bottom", fontsize=8)
  if names:
    low = min(loss[s] for s in names)
    ax.set_ylim(low - 0.05 * abs(low), max(loss[s] for s in names) + 0.04 * abs(low))
  report.style(ax, "LoRA targets", "loss, last quarter of training (nats/token)",
               "attention-only vs MLP-only vs all layers", legend=False)
  plots = [report.save(fig, ctx.out, "layers.png"),
           report.curves(results, ctx.out, "training loss by target set")]
  measured = [f"Loss over the last quarter of {plan.values['train']['steps']} steps (each "
              "batch scored before it is trained on), best of the LRs tried per condition "
              "(the LoRA rule x " + ", ".join(f"{f:g}" for f in plan.info["factors"]) +
              "): " + ", ".join(
                  f"{s} r={ranks[s]} ({params[s]:,} params) {loss[s]:.4f}" for s in names) + "."]
  headline = ", ".join(f"{s} {loss[s]:.3f}" for s in names) + " (nats)"
  return Outcome(verdict, measured, table, plots, headline)


register(Study(
    "layers", "Finding 1: which layers to adapt",
    "LoRA on the MLP alone is about as good as LoRA everywhere; attention-only LoRA is "
    "clearly worse, even with as many parameters.",
    "Llama-3.1-8B: attention-only r=256 (0.25B params) loses to MLP-only r=128 (0.24B); "
    "MLP-only ~= all layers (the post's layer-comparison figure).",
    verdicts.layers.__doc__.split("\n\n")[0].replace("\n  ", " ").strip() + f" {METRIC} "
    "Best of the LRs tried per condition; tolerance 0.01 nats; attention-only gets the "
    "smallest power-of-two rank with at least MLP-only's parameters.",
    layers_prepare, layers_analyse))


# --- lr (FINDINGS 2) ---------------------------------------------------------------------

def lr_prepare(ctx: Context) -> StudyPlan:
  values, cfg = _base(ctx, ctx.pick(3, 15, 200))
  steps = values["train"]["steps"]
  exponents = ctx.pick((-1, 0, 1), (-2, -1, 0, 1), (-3, -2, -1, 0, 1, 2))
  ranks = ctx.pick((4,), (4, 32), (4, 64, 256))
  arms = []
  full = hparams.full_ft_lr(cfg)
  for e in exponents:  # grids of factor 3 around each method's rule
    lr = full * 3.0 ** e
    arms.append(_arm(f"full-lr{_fmt_lr(lr)}", "FullFT", lr, train={"method": "full", "lr": lr}))
  for r in ranks:
    for e in exponents:
      lr = hparams.lora_lr(cfg, steps) * 3.0 ** e
      arms.append(_arm(f"lora-r{r}-lr{_fmt_lr(lr)}", f"LoRA r={r}", lr,
                       lora={"rank": r}, train={"method": "lora", "lr": lr}))
  return ctx.plan(values, arms)


def lr_analyse(ctx: Context, plan: StudyPlan, results) -> Outcome:
  optima = {}
  for series, rs in runner.by_series(results).items():
    optima[series] = verdicts.lr_optimum([r.arm.x for r in rs], [metric(r) for r in rs])
  full = optima.pop("FullFT", None)
  verdict = verdicts.lr_ratio(optima, full)
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for series, rs in runner.by_series(results).items():
    pts = sorted((r.arm.x, metric(r)) for r in rs if metric(r) is not None)
    if pts:
      ax.plot(*zip(*pts), "o-", label=series)
    o = full if series == "FullFT" else optima.get(series)
    if o is not None:
      ax.axvline(o.lr, ls=":", lw=1, color=ax.lines[-1].get_color() if pts else "k")
    for r in rs:
      if r.status != "done":
        ax.plot([r.arm.x], [ax.get_ylim()[1]], "x", color="k")
  report.style(ax, "learning rate (constant)", "loss, last quarter of training (nats/token)",
               "LR sweep: optimum per method (dotted: fitted)", logx=10)
  plots = [report.save(fig, ctx.out, "lr.png")]
  def says(name, o):
    return (f"{name} {o.lr:.3g}" + ("" if o.fitted else " (grid point)") +
            ("" if o.bracketed else " (at the grid's edge)")) if o else f"{name} -"
  measured = ["Optimal LR (parabola in log LR through the best point and its neighbours): " +
              ", ".join([says("FullFT", full)] + [says(k, o) for k, o in optima.items()]) +
              "."]
  if full:
    ratios = {k: o.lr / full.lr for k, o in optima.items() if o}
    measured.append("LoRA / FullFT optimum: " + ", ".join(f"{k} {v:.1f}x"
                                                           for k, v in ratios.items()) + ".")
    lows = [o.lr for o in optima.values() if o]
    if len(lows) > 1:
      measured.append(f"Across ranks the LoRA optimum moves {max(lows) / min(lows):.2f}x "
                      "(the post: < 2x between rank 4 and 512).")
    headline = "LoRA/FullFT optimal LR " + ", ".join(f"{k.split()[-1]} {v:.1f}x"
                                                      for k, v in ratios.items())
  else:
    headline = "no FullFT optimum"
  table = runner.summary_table(results, lambda r: {"series": r.arm.series, "lr": r.arm.x})
  return Outcome(verdict, measured, table, plots, headline)


register(Study(
    "lr", "Finding 2: LoRA's optimal learning rate is ~10x full fine-tuning's",
    "The optimal LoRA LR is about 10x the optimal FullFT LR (15x for runs under ~100 steps), "
    "and moves less than 2x across ranks.",
    "LR sweeps over 14 Llama and Qwen models; fit M_LoRA = 9.8 x M_FullFT (the post's LR-vs-"
    "loss curves per rank).",
    f"{METRIC} Each method's optimum is the minimum of a parabola in log10(LR) through its "
    "best grid point and both neighbours (a grid of factor 3 around the LR rule). Reproduced "
    "when, for every LoRA rank, LoRA's optimum / FullFT's is within [5, 20] and every optimum is "
    "bracketed; inconclusive when one lies at the grid's edge; otherwise not reproduced.",
    lr_prepare, lr_analyse))


# --- rank (FINDINGS 3) -------------------------------------------------------------------

def rank_prepare(ctx: Context) -> StudyPlan:
  values, cfg = _base(ctx, ctx.pick(6, 40, 500))
  lr = hparams.lora_lr(cfg, values["train"]["steps"])
  ranks = ctx.pick((1, 4), (1, 4, 16, 64), (1, 4, 16, 64, 256))
  arms = [_arm(f"r{r}", f"r={r}", r, lora={"rank": r}, train={"method": "lora", "lr": lr})
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


# --- batch (FINDINGS 4) ------------------------------------------------------------------

def batch_prepare(ctx: Context) -> StudyPlan:
  sizes = ctx.pick((2, 8), (1, 4, 16), (32, 128, 512))
  rows = ctx.pick(16, 64, 16384)  # rows of data.seq_len tokens every arm sees
  values, cfg = _base(ctx, 1)
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
    arms.append(_arm(f"full-b{b}", "FullFT", b, **same,
                     train={**train, "method": "full", "lr": hparams.full_ft_lr(cfg)}))
    arms.append(_arm(f"lora-b{b}", f"LoRA r={rank}", b, **same,
                     lora={"rank": rank}, train={**train, "method": "lora", "lr": lora_lr}))
  return ctx.plan(values, arms, rows=rows, rank=rank)


def batch_analyse(ctx: Context, plan: StudyPlan, results) -> Outcome:
  tol = 0.01
  final = {(r.arm.series.split()[0], int(r.arm.x)): metric(r) for r in results}
  sizes = sorted({b for _, b in final})
  gaps = {b: (None if final.get(("LoRA", b)) is None or final.get(("FullFT", b)) is None
              else final[("LoRA", b)] - final[("FullFT", b)]) for b in sizes}
  verdict = verdicts.batch(gaps, tol)
  plt = report.pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  for method in ("FullFT", "LoRA"):
    pts = [(s, final[(method, s)]) for s in sizes if final.get((method, s)) is not None]
    if pts:
      a.plot(*zip(*pts), "o-", label=method)
  report.style(a, "batch size (rows), equal tokens", "loss, last quarter of training", logx=2)
  pts = [(s, g) for s, g in gaps.items() if g is not None]
  if pts:
    b.plot(*zip(*pts), "o-", color="#c44")
  b.axhline(0, color="gray", lw=0.8)
  report.style(b, "batch size (rows)", "LoRA minus FullFT (nats)", logx=2)
  plots = [report.save(fig, ctx.out, "batch.png"),
           report.curves(results, ctx.out, "training loss per batch size and method")]
  seq = plan.values["data"]["seq_len"]
  measured = [f"Every arm sees {plan.info['rows']} rows of {seq} tokens (equal tokens); "
              f"LoRA r={plan.info['rank']} at the LoRA rule, FullFT at its rule, constant LR. "
              "LoRA minus FullFT, loss over the last quarter of training: " + ", ".join(
                  f"batch {s} {g:+.4f}" for s, g in pts) + "."]
  table = runner.summary_table(results, lambda r: {"method": r.arm.series, "batch": int(r.arm.x),
                                                   "steps": len(r.curve())})
  headline = "gap " + ", ".join(f"b{s} {g:+.3f}" for s, g in pts)
  return Outcome(verdict, measured, table, plots, headline)


register(Study(
    "batch", "Finding 4: LoRA loses more to full fine-tuning at large batch sizes",
    "LoRA's gap to FullFT grows with batch size (about equal at 32, worse at 512), "
    "independently of rank; both do best at small batches.",
    "OpenThoughts3 10k-example subset, batch 32 to 512 (the post's batch-size figure).",
    verdicts.batch.__doc__.replace("\n  ", " ").strip() + f" {METRIC} Tolerance 0.01 nats; "
    "every arm trains on the same number of tokens, each method at its LR rule.",
    batch_prepare, batch_analyse))
