"""``capacity`` (FINDINGS 5): where LoRA falls behind full fine-tuning on pure memorisation,
and whether the advisor's 2-bits-per-parameter threshold rank predicts it.

The protocol of bench/capacity.py (its results: bench/RESULTS.md, "Capacity"): the
data is ``task:facts``, made-up keys with uniform random answers among 100, so each
answer carries exactly log2(100) bits and nothing generalises. The model is a tiny random
Llama with a word-level tokenizer in which every key and answer is one token. Stage 1
teaches the base the format on *another* table (full fine-tuning, data seed 1) and merges
it into a model (``trained.merge_run``); stage 2 trains FullFT and LoRA (all layers,
alpha 32) at several ranks on the experiment's table (seed 0), the same batches for all,
best of the LRs given. Metric: the final loss on the whole table (``eval.size``; the
full batches of it), in bits per answer.

The separation rank is the smallest rank within 0.5 bits per answer of FullFT; the
threshold is the rank whose parameters x 2 bits hold the table. ``full`` is the bench's
1000-exposure protocol (2000 facts, 31,250 steps = 1000 exposures per fact; its wall time:
bench/RESULTS.md, "1000 exposures per fact").
"""

from __future__ import annotations

import math
import os

from jlora.study import assets, report, runner
from jlora.study.registry import Context, Outcome, StudyPlan, Study, register
from jlora.study import verdicts

BITS = math.log2(100)
MARGIN = 0.5  # bits per answer


def _words(facts: int) -> list[str]:
  from jlora.data import tasks
  words = ["What", "is", "the", "code", "of", "?"] + [str(v) for v in range(100)]
  for seed in (0, 1):
    table = tasks.source("facts", seed=seed, size=facts)
    words += [table[i]["prompt"].split()[-1].rstrip("?") for i in range(facts)]
  return words


def _budget(ctx: Context) -> dict:
  return ctx.pick(
      dict(facts=200, hidden=32, format_steps=60, steps=60, batch=32, ranks=(1, 4),
           lr_full=(3e-3,), lr_lora=(3e-3,)),
      dict(facts=1000, hidden=64, format_steps=1500, steps=3000, batch=64, ranks=(1, 2, 4, 8),
           lr_full=(3e-3,), lr_lora=(1e-3,)),
      # bench/RESULTS.md's 1000-exposure measurement: its ranks and LRs
      dict(facts=2000, hidden=64, format_steps=1500, steps=31250, batch=64,
           ranks=(2, 4, 6, 8), lr_full=(3e-3,), lr_lora=(1e-3,)))


def _values(ctx: Context, model: str, seed: int, steps: int) -> dict:
  b = _budget(ctx)
  return {
      "model": {"path": model, "remat": False},
      "lora": {"alpha": 32.0},
      "train": {"steps": steps, "grad_clip": 0.0, "schedule": "constant",
                "log_every": max(steps // 60, 1), "checkpoint_every": steps, "keep": 1},
      "data": {"source": "task:facts", "size": b["facts"], "seed": seed, "seq_len": 16,
               "pack": False, "batch_size": b["batch"], "chat": False, "prefetch": 0},
      "eval": {"source": "task:facts", "split": "train", "size": b["facts"], "batches": 1000,
               "examples": 0},  # the whole table (full batches of it)
  }


def capacity_prepare(ctx: Context) -> StudyPlan:
  b = _budget(ctx)
  model = ctx.model or assets.tiny_model(os.path.join(ctx.out, "model"), hidden=b["hidden"],
                                         words=_words(b["facts"]))
  arm = runner.Arm("format", "format", None, {"train": {"method": "full", "lr": 3e-3}})
  return ctx.plan(_values(ctx, model, 1, b["format_steps"]), [arm], keep_checkpoints=True,
                  seeded=False)  # one format model, whatever --seeds


def _best(seeds_of_lrs, to_bits):
  """Of one rank's arms (every LR, every seed), the seeds of the LR whose mean final bits
  are lowest; None when none finished at every seed."""
  return runner.best_arm(seeds_of_lrs, lambda r: to_bits(r.final()))


def _plots(ctx: Context, best: dict, full_bits, threshold: float, measured_arms) -> list:
  """Final bits per answer against rank (FullFT and the threshold marked; +-1 s.e.), and
  the curves."""
  b = _budget(ctx)
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  ranks = [r for r in sorted(best) if r and best[r][0] is not None]
  ax.errorbar(ranks, [best[r][0].mean for r in ranks], yerr=[best[r][0].se or 0 for r in ranks],
              fmt="o-", capsize=3, label="LoRA")
  if full_bits is not None:
    ax.axhline(full_bits.mean, color="k", ls="--", label="FullFT")
  ax.axvline(threshold, color="g", ls=":", label="2 bits/param threshold")
  report.style(ax, "rank", "final loss on the table (bits/answer)",
               f"{b['facts']} random facts, {b['steps']} steps", logx=2)
  return [report.save(fig, ctx.out, "capacity.png"),
          report.curves(measured_arms, ctx.out, "training loss per arm")]


def capacity_analyse(ctx: Context, plan: StudyPlan, results) -> Outcome:
  from jlora import data, models
  from jlora.findings import advisor
  from jlora.run import trained
  b = _budget(ctx)
  fmt = os.path.join(ctx.out, "format_model")
  if not os.path.isdir(fmt):
    run_dir = runner.arm_config(plan.values, plan.arms[0], ctx.out)[0].run_dir
    trained.merge_run(run_dir, fmt)
  arms = [runner.Arm(f"full-lr{lr:g}", "FullFT", 0, {"train": {"method": "full", "lr": lr}})
          for lr in b["lr_full"]]
  arms += [runner.Arm(f"lora-r{r}-lr{lr:g}", f"LoRA r={r}", r,
                      {"lora": {"rank": r}, "train": {"method": "lora", "lr": lr}})
           for r in b["ranks"] for lr in b["lr_lora"]]
  stage2 = ctx.plan(_values(ctx, fmt, 0, b["steps"]), arms)
  every_seed = ctx.train(stage2)
  runner.write_results("capacity", list(results) + every_seed, ctx.out)
  tok = data.Tokenizer.from_model(fmt)
  per_answer = len(tok.tok.encode("42", add_special_tokens=False).ids) + 1  # value + <eos>
  to_bits = lambda nats: None if nats is None else nats * per_answer / math.log(2)  # noqa
  by_rank: dict[int, list] = {}
  for r in every_seed:
    by_rank.setdefault(int(r.arm.x), []).append(r)
  # per rank (0: FullFT) the seeds of its best LR (by the mean over seeds)
  chosen = {rank: seeds for rank, rs in by_rank.items() if (seeds := _best(rs, to_bits))}
  bits = {rank: runner.per_seed(seeds, lambda r: to_bits(r.final()))
          for rank, seeds in chosen.items()}
  best = {rank: (verdicts.estimate(list(v.values())), chosen[rank][0].summary.get("lr"))
          for rank, v in bits.items()}
  measured_arms = [r for seeds in chosen.values() for r in seeds]
  before = to_bits(measured_arms[0].summary.get("eval_loss_before")) if measured_arms else None
  model_cfg = models.read_config(fmt)
  info = b["facts"] * BITS
  params = {r: advisor.plan_for(model_cfg, r, "all", alpha=32.0).adapter_params
            for r in b["ranks"]}
  full_bits = best.get(0, (None,))[0]
  per_rank = params[b["ranks"][0]] / b["ranks"][0]
  threshold = info / (advisor.BITS_PER_PARAM * per_rank)
  gaps = {rank: (verdicts.paired(bits[rank], bits[0]) if rank in bits and 0 in bits
                 else None) for rank in b["ranks"]}  # every rank tried: None if unfinished
  where = verdicts.separation_text(*verdicts.separation(
      {r: g for r, g in gaps.items() if g is not None}, MARGIN))
  verdict = (verdicts.capacity(gaps, threshold, MARGIN) if full_bits is not None
             else verdicts.Verdict(verdicts.INCONCLUSIVE, "full fine-tuning did not finish"))
  table = [{"method": "FullFT" if r == 0 else "LoRA", "rank": r or None, "seeds": e.n,
            "params": params.get(r), "capacity bits (2/param)": 2 * params[r] if r else None,
            "best lr": lr, "final bits/answer": e.format(".3f"),
            "gap to full": None if not r or gaps.get(r) is None else gaps[r].format("+.3f"),
            "stored bits/param": (BITS - e.mean) * b["facts"] / params[r] if r else None}
           for r, (e, lr) in sorted(best.items()) if e is not None]
  plots = _plots(ctx, best, full_bits, threshold, measured_arms)
  exposures = b["steps"] * b["batch"] / b["facts"]
  measured = [f"{b['facts']} facts = {info:,.0f} bits; {b['steps']} steps x {b['batch']} "
              f"rows = {exposures:g} exposures per fact; before: "
              f"{'-' if before is None else f'{before:.2f}'} bits/answer. Threshold rank "
              f"{threshold:.1f}; separation (within {MARGIN:g} bits/answer of FullFT, at 2 "
              f"standard errors): {where}."]
  notes = ["FINDINGS 5 counts 2 bits per parameter; bench/RESULTS.md measured ~1 bit per "
           "LoRA parameter stored even after 1000 exposures per fact (the full budget)."]
  headline = f"separation at {where} vs threshold rank {threshold:.1f}"
  return Outcome(verdict, measured, table, plots, headline, notes)


register(Study(
    "capacity", "Finding 5: LoRA matches FullFT while its parameters can hold the data",
    "Networks store ~2 bits per parameter; LoRA matches FullFT while its parameters x 2 "
    "bits exceed the dataset's information, and falls behind beyond it.",
    "The post's capacity argument (random-label memorisation; ~2 bits per parameter).",
    "The separation rank is the smallest rank whose final loss, seed by seed, is within 0.5 "
    "bits/answer of FullFT's; with noise, between the smallest rank that could be (gap - 2 "
    "s.e. within the margin) and the smallest that clearly is (gap + 2 s.e.). The whole range "
    "within 2x of the 2-bits-per-parameter threshold rank: reproduced; wholly outside: not "
    "reproduced; across a bound, no rank near the margin, or an unfinished rank below the "
    "range: inconclusive (the first rank tried, within the margin, leaves the range open "
    "down to rank 1).",
    capacity_prepare, capacity_analyse))
