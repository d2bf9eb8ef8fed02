"""The numbers a study reduces its arms to, and the rules that turn them into a verdict.

Pure functions of plain numbers (no JAX, no files), so each rule is tested on synthetic
results, including the ones that must not say "reproduced". A verdict is one of
``REPRODUCED``, ``NOT_REPRODUCED`` or ``INCONCLUSIVE`` with the reason in one sentence;
each rule's docstring is the rule the report states.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Verdict:
  outcome: str
  reason: str

  def line(self) -> str:
    return f"**Verdict: {self.outcome}.** {self.reason}"


def _finite(x) -> bool:
  return x is not None and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class Optimum:
  lr: float  # the fitted optimum (or the best grid point when the fit is not usable)
  loss: float  # the best measured loss
  bracketed: bool  # the best grid point has a measured neighbour on each side
  fitted: bool  # lr is the parabola's vertex (else the best grid point)


def lr_optimum(lrs: Sequence[float], losses: Sequence[float | None]) -> Optimum | None:
  """The minimum of a parabola in log10(LR) through the best grid point and its two
  neighbours (diverged arms, None or non-finite, count as worse than any finite loss).
  Not bracketed (the best point at the grid's edge): the best point itself, marked so.
  None when no arm has a finite loss."""
  points = sorted((lr, loss if _finite(loss) else math.inf) for lr, loss in zip(lrs, losses))
  if not points or not any(math.isfinite(loss) for _, loss in points):
    return None
  i = min(range(len(points)), key=lambda k: points[k][1])
  best_lr, best = points[i]
  if i == 0 or i == len(points) - 1 or not math.isfinite(points[i - 1][1]) or \
      not math.isfinite(points[i + 1][1]):
    return Optimum(best_lr, best, bracketed=0 < i < len(points) - 1, fitted=False)
  (x0, y0), (x1, y1), (x2, y2) = [(math.log10(lr), y) for lr, y in points[i - 1:i + 2]]
  # The parabola through three points (divided differences); its vertex is -b / 2a.
  d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
  a = (d12 - d01) / (x2 - x0)
  if a <= 0:  # not convex (flat): the best point
    return Optimum(best_lr, best, bracketed=True, fitted=False)
  vertex = (x0 + x1) / 2 - d01 / (2 * a)
  vertex = min(max(vertex, x0), x2)  # never outside the bracketing points
  return Optimum(10 ** vertex, best, bracketed=True, fitted=True)


def lr_ratio(lora: dict[str, Optimum | None], full: Optimum | None,
             low: float = 5.0, high: float = 20.0) -> Verdict:
  """Reproduced when, for every LoRA rank, the optimum LoRA LR over FullFT's optimum is
  within [low, high] and every optimum is bracketed by the grid; inconclusive when one is
  not bracketed (or missing); otherwise not reproduced."""
  if full is None or any(o is None for o in lora.values()):
    return Verdict(INCONCLUSIVE, "an arm group has no finite loss at any LR")
  edge = [name for name, o in {**lora, "FullFT": full}.items() if not o.bracketed]
  if edge:
    return Verdict(INCONCLUSIVE, f"the best LR of {', '.join(edge)} is at the edge of the "
                   "grid: widen the sweep")
  ratios = {name: o.lr / full.lr for name, o in lora.items()}
  text = ", ".join(f"{name} {r:.1f}x" for name, r in ratios.items())
  if all(low <= r <= high for r in ratios.values()):
    return Verdict(REPRODUCED, f"LoRA's optimal LR over FullFT's: {text} (rule: within "
                   f"[{low:g}, {high:g}])")
  return Verdict(NOT_REPRODUCED, f"LoRA's optimal LR over FullFT's: {text}, outside "
                 f"[{low:g}, {high:g}]")


def layers(attn: float | None, mlp: float | None, all_: float | None,
           tol: float) -> Verdict:
  """Held-out losses of attention-only, MLP-only and all-layer LoRA (attention-only with at
  least MLP-only's parameters). Reproduced when attention-only is worse than MLP-only by
  more than ``tol`` and MLP-only is within ``tol`` of all layers (either way); not
  reproduced when attention-only is better than MLP-only by more than ``tol``, or MLP-only
  and all layers differ by more than ``tol``; inconclusive when attention-only and
  MLP-only are within ``tol`` of each other."""
  if not all(_finite(x) for x in (attn, mlp, all_)):
    return Verdict(INCONCLUSIVE, "an arm diverged or did not finish")
  gap, diff = attn - mlp, mlp - all_
  said = (f"attention-only minus MLP-only {gap:+.4f} nats, MLP-only minus all layers "
          f"{diff:+.4f} (tolerance {tol:g})")
  if gap > tol and abs(diff) <= tol:
    return Verdict(REPRODUCED, said)
  if gap < -tol:
    return Verdict(NOT_REPRODUCED, said + ": attention-only is the better one")
  if gap > tol:
    return Verdict(NOT_REPRODUCED, said + ": attention-only is worse, as claimed, but "
                   "MLP-only and all layers are not about equal")
  return Verdict(INCONCLUSIVE, said + ": attention-only and MLP-only are within the "
                 "tolerance")


def rank(curves: dict[int, Sequence[tuple[int, float]]], final: dict[int, float | None],
         early_steps: int, rel_tol: float, tol: float) -> Verdict:
  """Training-loss curves per rank (the same batches for every rank) and final losses.
  "Coincide early": over the steps 2..early_steps (step 1 is before any update: equal by
  construction) the spread across ranks, (max - min) / mean, stays within
  ``rel_tol``. "Fall off later": the lowest rank's final loss is above the highest
  rank's by more than ``tol``. Reproduced: both; not reproduced: the curves do not
  coincide early, or the highest rank ends worse than the lowest by more than ``tol``;
  inconclusive: they coincide early and no rank falls off within this budget."""
  if len(curves) < 2 or not all(_finite(final.get(r)) for r in curves):
    return Verdict(INCONCLUSIVE, "fewer than two ranks finished")
  by_step: dict[int, list[float]] = {}
  for points in curves.values():
    for step, loss in points:
      if 2 <= step <= early_steps:
        by_step.setdefault(step, []).append(loss)
  spreads = [(max(v) - min(v)) / (sum(v) / len(v)) for v in by_step.values()
             if len(v) == len(curves)]
  if not spreads or not all(math.isfinite(s) for s in spreads):
    return Verdict(INCONCLUSIVE, f"no common logged steps in 2..{early_steps}")
  spread = max(spreads)
  low, high = min(curves), max(curves)
  drop = final[low] - final[high]
  said = (f"largest early spread (steps 2-{early_steps}) {spread:.2%} (tolerance "
          f"{rel_tol:.0%}); final loss rank {low} minus rank {high}: {drop:+.4f} "
          f"nats (tolerance {tol:g})")
  if spread > rel_tol or drop < -tol:
    return Verdict(NOT_REPRODUCED, said)
  if drop > tol:
    return Verdict(REPRODUCED, said)
  return Verdict(INCONCLUSIVE, said + ": the curves coincide early, but no rank falls off "
                 "within this budget")


def batch(gaps: dict[int, float | None], tol: float) -> Verdict:
  """``gaps``: LoRA's held-out loss minus FullFT's, per batch size, at equal tokens.
  Reproduced when the gap at the largest batch exceeds the gap at the smallest by more
  than ``tol``; not reproduced when it is smaller by more than ``tol``; else inconclusive."""
  if len(gaps) < 2 or not all(_finite(g) for g in gaps.values()):
    return Verdict(INCONCLUSIVE, "an arm diverged or did not finish")
  small, large = min(gaps), max(gaps)
  growth = gaps[large] - gaps[small]
  said = (f"LoRA minus FullFT: {gaps[small]:+.4f} nats at batch {small}, {gaps[large]:+.4f} "
          f"at batch {large} (growth {growth:+.4f}, tolerance {tol:g})")
  if growth > tol:
    return Verdict(REPRODUCED, said)
  if growth < -tol:
    return Verdict(NOT_REPRODUCED, said)
  return Verdict(INCONCLUSIVE, said + ": the gap does not change by more than the tolerance")


def flop_ratio(ratio: float, low: float = 0.67, high: float = 0.72) -> Verdict:
  """Reproduced when LoRA's FLOPs per token over FullFT's, at the largest width, is within
  [low, high]; else not reproduced."""
  if not _finite(ratio):
    return Verdict(INCONCLUSIVE, "no FLOP count")
  said = f"LoRA / FullFT FLOPs per token at the largest width: {ratio:.3f}"
  inside = low <= ratio <= high
  return Verdict(REPRODUCED if inside else NOT_REPRODUCED,
                 f"{said} ({'within' if inside else 'outside'} [{low:g}, {high:g}])")


def capacity(separation: int | None, threshold: float, factor: float = 2.0) -> Verdict:
  """``separation``: the smallest rank whose final loss is within the margin of FullFT's;
  ``threshold``: the rank at which LoRA's parameters x 2 bits hold the data. Reproduced when
  they agree within ``factor``; inconclusive when no rank reached FullFT; else not."""
  if separation is None:
    return Verdict(INCONCLUSIVE, "no rank came within the margin of full fine-tuning")
  ratio = separation / threshold
  said = (f"separation rank {separation} vs the 2-bits-per-parameter threshold "
          f"{threshold:.1f}: ratio {ratio:.2f}")
  inside = 1 / factor <= ratio <= factor
  return Verdict(REPRODUCED if inside else NOT_REPRODUCED,
                 f"{said} ({'within' if inside else 'outside'} {factor:g}x)")


def matches(low_rank: float | None, full: float | None, tol: float, what: str) -> Verdict:
  """RL: rank 1 matches full fine-tuning when its final ``what`` is no more than ``tol``
  below FullFT's (reproduced); more than ``tol`` below: not reproduced."""
  if not (_finite(low_rank) and _finite(full)):
    return Verdict(INCONCLUSIVE, "an arm diverged or did not finish")
  said = f"{what}: rank 1 {low_rank:.4g}, FullFT {full:.4g} (tolerance {tol:g})"
  return Verdict(REPRODUCED if low_rank >= full - tol else NOT_REPRODUCED, said)
