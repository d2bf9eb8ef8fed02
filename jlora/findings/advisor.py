"""The low-regret advisor: checks a run's config against the findings ("LoRA Without
Regret"; docs/FINDINGS.md) before it starts. Each rule gives a severity (ok / warn /
error), a one-line reason and the finding it comes from; ``jlora advise CONFIG`` prints
the report and ``jlora train`` prints it and refuses an "error" unless ``--force``.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jlora.core import lora
from jlora.findings import hparams
from jlora.models.config import ModelConfig

BITS_PER_PARAM = 2.0  # FINDINGS 5: networks store ~2 bits per parameter
# Bits per adapter parameter LoRA stored in jlora's capacity measurement (bench/RESULTS.md,
# "1000 exposures per fact"). Used only to say how tight a fit is; the rule itself stays
# FINDINGS 5's.
LORA_BITS_MEASURED = 1.0
BATCH_WARN, BATCH_STRONG = 256, 1024  # FINDINGS 4
SEVERITIES = ("ok", "warn", "error")


@dataclasses.dataclass(frozen=True)
class Finding:
  rule: str
  severity: str
  message: str
  finding: int | None = None  # the numbered finding in docs/FINDINGS.md it comes from

  def __str__(self) -> str:
    source = "" if self.finding is None else f" [finding {self.finding}]"
    return f"{self.severity.upper():5s} {self.rule:9s} {self.message}{source}"


def plan_for(cfg: ModelConfig, rank: int, targets="all", **kw) -> lora.Plan:
  """The plan a rank and targets would give on this model (abstract shapes: no weights)."""
  from jlora import models
  spec = models.lora_spec(cfg, rank, targets=targets, **kw)
  return models.abstract_plan(cfg, spec)


def params_by_group(plan: lora.Plan) -> dict[str, int]:
  """LoRA parameters per group (attn / mlp / other) of a plan."""
  out = {"attn": 0, "mlp": 0, "other": 0}
  for t in plan.targets.values():
    group = "attn" if "/attn/" in t.path else "mlp" if "/mlp/" in t.path or "/moe/" in \
        t.path else "other"
    out[group] += t.num_params
  return out


def _experts_note(plan: lora.Plan) -> str:
  """"; each expert r=2 (r // 2)" for a plan with MoE experts (lora.expert_rank), else ""."""
  ranks = {t.rank for t in plan.targets.values() if "e" in t.layout}
  if not ranks:
    return ""
  return (f"; each expert r={max(ranks)} (r // {plan.spec.active_experts}: "
          "lora.expert_rank)")


def _coverage(cfg, plan: lora.Plan, kw) -> tuple[Finding, int]:
  groups = params_by_group(plan)
  total = sum(groups.values())
  if groups["mlp"] and groups["attn"]:
    return Finding("coverage", "ok", f"attention and MLP adapted ({total:,} LoRA params)"
                   f"{_experts_note(plan)}", 1), total
  rank = plan.spec.rank
  all_layers = plan_for(cfg, rank, "all", **kw).adapter_params
  same_size = max(1, round(rank * total / max(all_layers, 1)))
  missing = "MLP" if not groups["mlp"] else "attention"
  severity_note = ("attention-only LoRA is clearly worse even at matched size"
                   if not groups["mlp"] else "MLP-only is close to all layers")
  return Finding("coverage", "warn" if not groups["mlp"] else "ok",
                 f"{missing} layers not adapted: {severity_note}; all layers at rank "
                 f"{same_size} would have about the same {total:,} params", 1), total


def _learning_rate(cfg, lr, steps, method) -> Finding:
  try:
    rule = hparams.full_ft_lr(cfg) if method == "full" else hparams.lora_lr(cfg, steps)
  except ValueError:
    if lr is None:
      return Finding("lr", "error", f"no LR fit exists for the {cfg.model_type!r} family: "
                     "set train.lr (10x your FullFT LR for LoRA)", 2)
    return Finding("lr", "ok", f"lr {lr:.3g} given; no published fit for "
                   f"{cfg.model_type!r} to compare with (LoRA: ~10x FullFT)", 2)
  if lr is None:
    return Finding("lr", "ok", f"lr {rule:.3g} from the LR rule", 2)
  ratio = lr / rule
  if method == "lora":
    full = hparams.full_ft_lr(cfg)
    if 0.5 <= lr / full <= 2:
      return Finding("lr", "warn", f"lr {lr:.3g} is a FULL fine-tuning LR (fit {full:.3g}); "
                     f"LoRA's optimum is ~10x higher: {rule:.3g}", 2)
  if 0.5 <= ratio <= 2:
    return Finding("lr", "ok", f"lr {lr:.3g} is {ratio:.2g}x the rule ({rule:.3g})", 2)
  return Finding("lr", "warn", f"lr {lr:.3g} is {ratio:.2g}x the rule's {rule:.3g} "
                 "(outside 0.5x-2x)", 2)


def _batch(batch_rows: int, examples_per_row: float | None) -> Finding:
  examples = batch_rows * (examples_per_row or 1.0)
  what = (f"{batch_rows} rows (~{examples:.0f} examples packed)" if examples_per_row
          else f"{batch_rows} sequences")
  if examples >= BATCH_STRONG:
    return Finding("batch", "warn", f"batch of {what} per step is >= {BATCH_STRONG}: LoRA "
                   "falls clearly behind FullFT at large batches whatever the rank; "
                   "strongly prefer <= 256", 4)
  if examples > BATCH_WARN:
    return Finding("batch", "warn", f"batch of {what} per step is > {BATCH_WARN}: LoRA "
                   "loses to FullFT more as the batch grows; keep <= 256", 4)
  return Finding("batch", "ok", f"batch of {what} per step (<= {BATCH_WARN})", 4)


def _capacity(info_bits, basis, trainable_params, rank, method) -> Finding:
  capacity = BITS_PER_PARAM * trainable_params
  if info_bits is None:
    return Finding("capacity", "ok", f"capacity {capacity:.3g} bits; no dataset statistics "
                   "to compare with", 5)
  # The rank that holds the data at 2 bits/param, and at what LoRA measurably stores.
  need, safe = (math.ceil(rank * info_bits / (bits * trainable_params))
                for bits in (BITS_PER_PARAM, LORA_BITS_MEASURED))
  if method == "full" or info_bits <= capacity:
    tight = (method != "full" and info_bits > LORA_BITS_MEASURED * trainable_params)
    return Finding("capacity", "ok", f"dataset ~{info_bits:.3g} bits ({basis}) <= "
                   f"{BITS_PER_PARAM:g} bits x {trainable_params:,} params"
                   + (f"; tight: LoRA measured ~{LORA_BITS_MEASURED:g} bit/param, rank "
                      f">= {safe} is safe" if tight else ""), 5)
  severity = "error" if info_bits > 10 * capacity else "warn"
  return Finding("capacity", severity, f"dataset ~{info_bits:.3g} bits ({basis}) exceeds "
                 f"{BITS_PER_PARAM:g} bits x {trainable_params:,} LoRA params: LoRA will "
                 f"fall behind FullFT; rank >= {need} would hold it (>= {safe} at the "
                 f"~{LORA_BITS_MEASURED:g} bit/param LoRA measured)", 5)


def _alpha(alpha, rslora, lr) -> Finding:
  if rslora and lr is None:
    return Finding("alpha", "warn", "rsLoRA (alpha/sqrt(r)) with the LR rule: the rule was "
                   "fit with alpha/r, so the effective LR now grows with sqrt(r)", 3)
  if alpha != 32:
    return Finding("alpha", "warn", f"alpha {alpha:g}: the LR rule assumes alpha 32 with "
                   "alpha/r scaling; keep alpha fixed across ranks when sweeping", 3)
  return Finding("alpha", "ok", "alpha 32 with alpha/r: the optimal LR barely moves with "
                 "rank", 3)


def compute_ratio(cfg: ModelConfig, lora_params: int) -> float:
  """LoRA / FullFT training FLOPs per token over the dense kernels (FINDINGS 7): FullFT
  runs 3 matmuls per weight (forward, input grad, weight grad); LoRA skips the frozen
  weight's gradient and adds ~6 r (in + out) for the factors."""
  from jlora import models
  dense = sum(math.prod(s) for p, s in models.param_shapes(models.Transformer(cfg)).items()
              if p.endswith("kernel"))
  if cfg.is_moe:  # only the routed experts run per token
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.num_layers
    dense -= expert * (cfg.num_experts - cfg.experts_per_token)
  return (2 * dense + 3 * lora_params) / (3 * dense)


def advise(cfg: ModelConfig, *, rank: int, targets="all", alpha: float = 32.0,
           rslora: bool = False, lr: float | None = None, steps: int | None = None,
           method: str = "lora", batch_rows: int = 32, examples_per_row: float | None = None,
           info_bits: float | None = None, info_basis: str = "",
           lora_kwargs: dict | None = None, plan: lora.Plan | None = None) -> list[Finding]:
  """The findings for one run (see the module docstring). ``plan``: what will actually be
  trained (e.g. a PEFT adapter's ranks and targets); it overrides rank, targets, alpha
  and rslora."""
  if plan is not None and method == "lora":
    rank, alpha, rslora = plan.spec.rank, plan.spec.alpha, plan.spec.rslora
  kw = dict(lora_kwargs or {}, alpha=alpha, rslora=rslora)
  out = []
  if method == "lora":
    plan = plan or plan_for(cfg, rank, targets, **kw)
    coverage, params = _coverage(cfg, plan, kw)
    out.append(coverage)
  else:
    from jlora import models
    params = sum(math.prod(s) for s in models.param_shapes(models.Transformer(cfg)).values())
  out.append(_learning_rate(cfg, lr, steps, method))
  out.append(_batch(batch_rows, examples_per_row))
  out.append(_capacity(info_bits, info_basis, params, rank, method))
  if method == "lora":
    out.append(_alpha(alpha, rslora, lr))
    ratio = compute_ratio(cfg, params)
    out.append(Finding("compute", "ok", f"LoRA training costs ~{ratio:.2f}x FullFT's FLOPs "
                       "per token (no gradient for frozen weights)", 7))
  return out


def rl_capacity(steps: int, episodes_per_step: int, bits_per_episode: float,
                trainable_params: int, method: str = "lora") -> Finding:
  """FINDINGS 6: a policy-gradient episode carries ~1 bit (its advantage is a function of
  one scalar reward: at most log2 of the number of distinct rewards), so an RL run's
  information is episodes x bits, far below what even rank 1 can hold."""
  bits = steps * episodes_per_step * bits_per_episode
  capacity = BITS_PER_PARAM * trainable_params
  what = "LoRA" if method == "lora" else "trained"
  line = (f"RL: {steps} steps x {episodes_per_step} episodes x <= {bits_per_episode:g} bit = "
          f"{bits:,.0f} bits vs {BITS_PER_PARAM:g} bits x {trainable_params:,} {what} params "
          f"({bits / capacity:.2g}x capacity)")
  if bits <= capacity:
    return Finding("rl", "ok", line + (": any rank has room (rank 1 matches FullFT)"
                                       if method == "lora" else ""), 6)
  return Finding("rl", "warn", line + ": more than the adapters can hold; raise the rank", 6)


def _factored_learning_rate(cfg, lr, steps, method, factor: float, who: str) -> Finding:
  """The LR finding for an objective whose default LR is ``factor`` x the SFT rule (RL,
  preference tuning: ``who``): ``_learning_rate``'s where the model has no published fit,
  else the LR against the rule, a warning above half of it. Why a tenth: bench/RESULTS.md,
  "RL with LoRA" and "DPO"."""
  finding = _learning_rate(cfg, lr, steps, method)
  if finding.severity == "error" or "no published fit" in finding.message:
    return finding
  rule = hparams.full_ft_lr(cfg) if method == "full" else hparams.lora_lr(cfg, steps)
  if lr is None:
    return Finding("lr", "ok", f"lr {factor * rule:.3g}: {factor:g}x the SFT rule's "
                   f"{rule:.3g} ({who}'s default: the rule's LR collapsed {who} runs here)",
                   2)
  ratio = lr / rule
  return Finding("lr", "warn" if ratio > 0.5 else "ok",
                 f"lr {lr:.3g} is {ratio:.2g}x the SFT rule's {rule:.3g}; for {who} jlora "
                 f"measured the rule's LR collapsing and {factor:g}x of it stable", 2)


def advise_rl(run_cfg, model_cfg: ModelConfig, plan: lora.Plan | None,
              episodes_per_step: int, bits_per_episode: float) -> list[Finding]:
  """``advise_run`` for policy-gradient RL: coverage and alpha as for SFT, the LR against
  RL's factor on the rule, and capacity in episodes x bits (FINDINGS 6)."""
  l, t = run_cfg.lora, run_cfg.train
  if t.method == "lora":
    plan = plan or plan_for(model_cfg, l.rank, l.targets, alpha=l.alpha, rslora=l.rslora,
                            full=tuple(l.full))
    coverage, params = _coverage(model_cfg, plan, {"alpha": l.alpha, "rslora": l.rslora})
    out = [coverage]
  else:
    from jlora import models
    params = sum(math.prod(s) for s in
                 models.param_shapes(models.Transformer(model_cfg)).values())
    out = []
  out.append(_factored_learning_rate(model_cfg, t.lr, t.steps, t.method,
                                     hparams.RL_LR_FACTOR, "RL"))
  out.append(rl_capacity(t.steps, episodes_per_step, bits_per_episode, params, t.method))
  if t.method == "lora":
    out.append(_alpha(plan.spec.alpha, plan.spec.rslora, t.lr))
  requantised = _requantised(run_cfg.model.path, run_cfg.model.quantize)
  return out + ([requantised] if requantised else [])


def advise_preference(run_cfg, model_cfg: ModelConfig, stats=None,
                      plan: lora.Plan | None = None) -> list[Finding]:
  """``advise_run`` for preference tuning (``jlora dpo``): its LR against the preference
  factor on the rule (``hparams.PREFERENCE_LR_FACTOR``), batches of pairs."""
  t = run_cfg.train
  lr = _factored_learning_rate(model_cfg, t.lr, t.steps, t.method,
                               hparams.PREFERENCE_LR_FACTOR, "preference tuning")
  return [lr if f.rule == "lr" else f for f in advise_run(run_cfg, model_cfg, stats, plan)]


def advise_run(run_cfg, model_cfg: ModelConfig, stats=None, plan: lora.Plan | None = None
               ) -> list[Finding]:
  """``advise`` for a jlora RunConfig (``stats``: ``jlora.data.Stats`` when available;
  ``plan``: the run's resolved plan, so the advisor checks what will be trained)."""
  l, t, d = run_cfg.lora, run_cfg.train, run_cfg.data
  per_row = None
  if stats is not None and d.pack and stats.examples:
    per_row = max(1.0, d.seq_len / max(stats.tokens / stats.examples, 1.0))
  out = advise(model_cfg, rank=l.rank, targets=l.targets, alpha=l.alpha, rslora=l.rslora,
               lr=t.lr, steps=t.steps, method=t.method, batch_rows=d.batch_size,
               examples_per_row=per_row,
               info_bits=None if stats is None else stats.info_bits,
               info_basis="" if stats is None else stats.info_basis,
               lora_kwargs={"full": tuple(l.full)}, plan=plan)
  requantised = _requantised(run_cfg.model.path, run_cfg.model.quantize)
  return out + ([requantised] if requantised else [])


def _requantised(path: str, quantize: str) -> Finding | None:
  """A warning when int8 / nf4 would quantise a GGUF's already quantised kernels again
  (not one of the post's findings: jlora's own measurement, bench/RESULTS.md)."""
  if quantize not in ("int8", "nf4"):
    return None
  from jlora import models
  from jlora.core import ggml
  path = models.resolve(path)
  if not path.endswith(".gguf"):
    return None
  types = sorted({t.tensor_type.name for t in models.gguf_loader.open_reader(path).tensors}
                 - set(ggml.FLOAT_TYPES))
  if not types:
    return None
  return Finding("quantize", "warn", f"model.quantize={quantize!r} quantises "
                 f"{os.path.basename(path)}'s {'/'.join(types)} blocks again (the two rounding "
                 "errors add up: +0.21 nats per token on SmolLM2 under nf4); "
                 "model.quantize='gguf' trains on the file's own blocks")


def report(findings: list[Finding]) -> str:
  return "\n".join(str(f) for f in findings)


def has_error(findings: list[Finding]) -> bool:
  return any(f.severity == "error" for f in findings)
