"""The numbers a study reduces its arms to, and the rules that turn them into a verdict.

Pure functions of plain numbers (no JAX, no files), so each rule is tested on synthetic
results, including the ones that must not say "reproduced". A verdict is one of
``REPRODUCED``, ``NOT_REPRODUCED`` or ``INCONCLUSIVE`` with the reason in one sentence;
each rule's docstring is the rule the report states.

Noise: a study trains every arm at K seeds (``jlora study --seeds K``: the adapter init and
the data order move, the base and the held-out set stay). A quantity is an ``Estimate``:
the mean over seeds and its standard error (the sample standard deviation / sqrt(K); None
at one seed). A difference between two arms is taken seed by seed (``paired``: arms at
the same seed see the same batches, so the pairing removes the order's share of the
noise). The rules then read an estimate in one of four ways, all at 2 standard errors:
- ``above(d, tol)``: d is larger than ``tol`` and not within 2 s.e. of zero;
- ``below(d, tol)``: the mirror image;
- ``equal(d, tol)``: the whole interval d +- 2 s.e. lies within +-tol;
- ``apart(d, tol)``: the whole interval lies outside +-tol.
So a difference within 2 standard errors of zero is never "different" (it is what noise
gives), and "equal" needs the noise to be small against the tolerance. At one seed the
standard error is unknown and the rules compare the mean with the tolerance alone, as the
one-seed reports did (they say so).
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
class Estimate:
  """A quantity measured at ``n`` seeds: the mean and its standard error (None at n = 1)."""
  mean: float
  se: float | None
  n: int

  def __str__(self) -> str:
    return self.format()

  def format(self, spec: str = "+.4f") -> str:
    return f"{self.mean:{spec}}" + ("" if self.se is None else
                                     f" ± {format(self.se, spec.lstrip('+'))}")

  def __sub__(self, other: "Estimate") -> "Estimate":
    """An unpaired difference (independent errors add in quadrature)."""
    se = None if self.se is None or other.se is None else math.hypot(self.se, other.se)
    return Estimate(self.mean - other.mean, se, min(self.n, other.n))

  @property
  def noise(self) -> float:
    """Two standard errors (0 when unknown)."""
    return 2 * self.se if self.se is not None else 0.0


def estimate(values: Sequence[float | None]) -> Estimate | None:
  """Mean and standard error of per-seed values; None when any seed is missing or not
  finite (a diverged or unfinished arm)."""
  values = list(values)
  if not values or not all(_finite(v) for v in values):
    return None
  n = len(values)
  mean = sum(values) / n
  if n == 1:
    return Estimate(mean, None, 1)
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return Estimate(mean, math.sqrt(var / n), n)


def paired(a: dict[int, float | None], b: dict[int, float | None]) -> Estimate | None:
  """``a - b`` seed by seed over the seeds both have ({seed: value}); None when they share
  none or a shared seed's value is missing."""
  seeds = sorted(set(a) & set(b))
  if not seeds or not all(_finite(a[k]) and _finite(b[k]) for k in seeds):
    return None
  return estimate([a[k] - b[k] for k in seeds])


def above(d: Estimate, tol: float) -> bool:
  """Larger than ``tol`` and not within 2 standard errors of zero."""
  return d.mean > tol and d.mean > d.noise


def below(d: Estimate, tol: float) -> bool:
  return d.mean < -tol and -d.mean > d.noise


def equal(d: Estimate, tol: float) -> bool:
  """The interval mean +- 2 s.e. lies within [-tol, tol]."""
  return abs(d.mean) + d.noise <= tol


def apart(d: Estimate, tol: float) -> bool:
  """The interval mean +- 2 s.e. lies outside [-tol, tol]."""
  return abs(d.mean) - d.noise > tol


def _seeds(*estimates: Estimate) -> str:
  n = min(e.n for e in estimates)
  return (f"mean +- s.e. over {n} seeds" if n > 1 else
          "one seed: no standard error, the tolerance alone decides")


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


def lr_ratio(lora: dict[str, dict[int, Optimum | None]], full: dict[int, Optimum | None],
             low: float = 5.0, high: float = 20.0) -> Verdict:
  """Per seed ({seed: optimum}), each method's optimum; LoRA's over FullFT's is taken seed
  by seed (the seeds both have) and averaged in log10. Reproduced when, for every LoRA rank, the ratio's interval (2 s.e.,
  in log10) lies within [low, high] and every optimum is bracketed by the grid; not
  reproduced when a rank's interval lies wholly outside; otherwise (an optimum at the
  grid's edge, an interval across a bound) inconclusive."""
  if not full or any(o is None for o in full.values()) or \
      any(not os or any(o is None for o in os.values()) or not set(os) & set(full)
          for os in lora.values()):
    return Verdict(INCONCLUSIVE, "an arm group has no finite loss at any LR")
  edge = [name for name, os in {**lora, "FullFT": full}.items()
          if not all(o.bracketed for o in os.values())]
  if edge:
    return Verdict(INCONCLUSIVE, f"the best LR of {', '.join(edge)} is at the edge of the "
                   "grid: widen the sweep")
  logs = {name: paired({k: math.log10(o.lr) for k, o in os.items()},
                      {k: math.log10(o.lr) for k, o in full.items()})
          for name, os in lora.items()}
  lo, hi = math.log10(low), math.log10(high)
  text = ", ".join(f"{name} {10 ** e.mean:.1f}x" + (
      "" if e.se is None else f" (2 s.e.: {10 ** (e.mean - e.noise):.1f}-"
                              f"{10 ** (e.mean + e.noise):.1f}x)") for name, e in logs.items())
  said = f"LoRA's optimal LR over FullFT's: {text} ({_seeds(*logs.values())})"
  if all(lo <= e.mean - e.noise and e.mean + e.noise <= hi for e in logs.values()):
    return Verdict(REPRODUCED, f"{said}; rule: within [{low:g}, {high:g}]")
  if any(e.mean + e.noise < lo or e.mean - e.noise > hi for e in logs.values()):
    return Verdict(NOT_REPRODUCED, f"{said}, outside [{low:g}, {high:g}]")
  return Verdict(INCONCLUSIVE, f"{said}: an interval crosses [{low:g}, {high:g}]'s bounds")


def layers(gap: Estimate | None, diff: Estimate | None, tol: float) -> Verdict:
  """``gap``: attention-only's held-out loss minus MLP-only's (attention-only with at
  least MLP-only's parameters); ``diff``: MLP-only's minus all layers'. Reproduced when
  attention-only is worse by more than ``tol`` (and not within 2 s.e. of zero) and
  MLP-only equals all layers within ``tol`` (the whole 2-s.e. interval); not reproduced
  when attention-only is clearly the better one, or clearly worse while MLP-only and all
  layers clearly differ by more than ``tol``; inconclusive otherwise."""
  if gap is None or diff is None:
    return Verdict(INCONCLUSIVE, "an arm diverged or did not finish")
  said = (f"attention-only minus MLP-only {gap} nats, MLP-only minus all layers {diff} "
          f"(tolerance {tol:g}; {_seeds(gap, diff)})")
  if above(gap, tol) and equal(diff, tol):
    return Verdict(REPRODUCED, said)
  if below(gap, tol):
    return Verdict(NOT_REPRODUCED, said + ": attention-only is the better one")
  if above(gap, tol) and apart(diff, tol):
    return Verdict(NOT_REPRODUCED, said + ": attention-only is worse, as claimed, but "
                   "MLP-only and all layers are not about equal")
  if not above(gap, tol):
    return Verdict(INCONCLUSIVE, said + ": attention-only and MLP-only are within the "
                   "tolerance or within 2 standard errors of each other")
  return Verdict(INCONCLUSIVE, said + ": MLP-only vs all layers is neither within nor "
                 "beyond the tolerance at 2 standard errors")


def early_spread(curves: dict[int, Sequence[tuple[int, float]]], early_steps: int
                 ) -> float | None:
  """The largest (max - min) / mean across the curves at a step in 2..early_steps that
  every curve logged; None when there is none."""
  by_step: dict[int, list[float]] = {}
  for points in curves.values():
    for step, loss in points:
      if 2 <= step <= early_steps:
        by_step.setdefault(step, []).append(loss)
  spreads = [(max(v) - min(v)) / (sum(v) / len(v)) for v in by_step.values()
             if len(v) == len(curves)]
  if not spreads or not all(math.isfinite(s) for s in spreads):
    return None
  return max(spreads)


def rank(spread: Estimate | None, drop: Estimate | None, early_steps: int, rel_tol: float,
         tol: float, ranks: tuple[int, int] = (1, 64)) -> Verdict:
  """``spread``: per seed, the largest spread of the training-loss curves across ranks,
  (max - min) / mean, over the steps 2..early_steps (step 1 is before any update: equal by
  construction; every rank sees the same batches at a seed), ``early_spread``; ``drop``:
  the lowest rank's final loss minus the highest rank's (``ranks``), seed by seed.
  "Coincide early": the spread's 2-s.e. interval lies within ``rel_tol``. "Fall off
  later": the drop is above ``tol`` and not within 2 s.e. of zero. Reproduced: both; not
  reproduced: the spread is clearly above ``rel_tol`` (its whole interval), or the
  highest rank ends clearly worse (by more than ``tol``); inconclusive otherwise."""
  if spread is None or drop is None:
    return Verdict(INCONCLUSIVE, "fewer than two ranks finished, or no common logged steps "
                   f"in 2..{early_steps}")
  low, high = ranks
  pct = (f"{100 * spread.mean:.2f}%" + ("" if spread.se is None else
                                          f" ± {100 * spread.se:.2f}"))
  said = (f"largest early spread (steps 2-{early_steps}) {pct} (tolerance {rel_tol:.0%}); "
          f"final loss rank {low} minus rank {high}: {drop} nats (tolerance {tol:g}; "
          f"{_seeds(drop)})")
  if spread.mean - spread.noise > rel_tol or below(drop, tol):
    return Verdict(NOT_REPRODUCED, said)
  if spread.mean + spread.noise <= rel_tol and above(drop, tol):
    return Verdict(REPRODUCED, said)
  if spread.mean + spread.noise > rel_tol:
    return Verdict(INCONCLUSIVE, said + ": whether the curves coincide early is within 2 "
                   "standard errors of the tolerance")
  return Verdict(INCONCLUSIVE, said + ": the curves coincide early, but no rank clearly "
                 "falls off within this budget")


def batch(gaps: dict[int, Estimate | None], growth: Estimate | None, tol: float) -> Verdict:
  """``gaps``: LoRA's held-out loss minus FullFT's, per batch size, at equal tokens;
  ``growth``: the gap at the largest batch minus the gap at the smallest (seed by seed).
  Reproduced when the growth is above ``tol`` and not within 2 s.e. of zero; not
  reproduced when it is clearly below ``-tol``; else inconclusive."""
  if len(gaps) < 2 or growth is None or any(g is None for g in gaps.values()):
    return Verdict(INCONCLUSIVE, "an arm diverged or did not finish")
  small, large = min(gaps), max(gaps)
  said = (f"LoRA minus FullFT: {gaps[small]} nats at batch {small}, {gaps[large]} "
          f"at batch {large} (growth {growth}, tolerance {tol:g}; {_seeds(growth)})")
  if above(growth, tol):
    return Verdict(REPRODUCED, said)
  if below(growth, tol):
    return Verdict(NOT_REPRODUCED, said)
  return Verdict(INCONCLUSIVE, said + ": the gap does not clearly change by more than the "
                 "tolerance")


def flop_ratio(ratio: float, low: float = 0.67, high: float = 0.72) -> Verdict:
  """Reproduced when LoRA's FLOPs per token over FullFT's, at the largest width, is within
  [low, high]; else not reproduced."""
  if not _finite(ratio):
    return Verdict(INCONCLUSIVE, "no FLOP count")
  said = f"LoRA / FullFT FLOPs per token at the largest width: {ratio:.3f}"
  inside = low <= ratio <= high
  return Verdict(REPRODUCED if inside else NOT_REPRODUCED,
                 f"{said} ({'within' if inside else 'outside'} [{low:g}, {high:g}])")


def separation(gaps: dict[int, Estimate], margin: float) -> tuple[int | None, int | None]:
  """(the smallest rank whose gap could be within ``margin`` at 2 s.e., the smallest whose
  gap clearly is; None: no such rank among ``gaps``)."""
  ranks = sorted(gaps)
  earliest = next((r for r in ranks if gaps[r].mean - gaps[r].noise <= margin), None)
  latest = next((r for r in ranks if gaps[r].mean + gaps[r].noise <= margin), None)
  return earliest, latest


def separation_text(earliest: int | None, latest: int | None) -> str:
  if earliest is None:
    return "no rank tried"
  if earliest == latest:
    return f"rank {earliest}"
  return f"ranks {earliest}-{latest}" if latest else f"rank {earliest} or above"


def capacity(gaps: dict[int, Estimate | None], threshold: float, margin: float,
             factor: float = 2.0) -> Verdict:
  """``gaps``: per rank tried, LoRA's final loss minus FullFT's (bits per answer, seed by
  seed; None: the rank did not finish at every seed); ``threshold``: the rank at which
  LoRA's parameters x 2 bits hold the data. The separation rank is the smallest rank whose
  gap is within ``margin``; with noise it lies between the smallest rank whose gap could be
  within it (gap - 2 s.e. <= margin) and the smallest whose gap clearly is (gap + 2 s.e. <=
  margin; none: beyond the ranks tried); when the smallest rank tried could already be
  within it, the separation may lie anywhere down to rank 1. Reproduced when that whole
  range is within ``factor`` of the threshold; not reproduced when it lies wholly outside;
  inconclusive otherwise, when no rank could be within the margin, or when a rank below
  the range's top did not finish."""
  done = {r: g for r, g in sorted(gaps.items()) if g is not None}
  earliest, latest = separation(done, margin)
  gaps_text = ", ".join(f"r{r} {g.format('+.2f')}" for r, g in done.items())
  if earliest is None:
    return Verdict(INCONCLUSIVE, f"no rank came within the margin of full fine-tuning (gaps "
                   f"{gaps_text} bits/answer, margin {margin:g})")
  missing = [r for r, g in sorted(gaps.items()) if g is None and (latest is None or r < latest)]
  if missing:
    return Verdict(INCONCLUSIVE, f"rank {missing[0]} did not finish at every seed, and the "
                   f"separation could lie there (gaps {gaps_text} bits/answer)")
  lowest = 1 if earliest == min(gaps) else earliest  # at or below the first rank tried
  low = lowest / threshold
  high = math.inf if latest is None else latest / threshold
  where = separation_text(earliest, latest) + (
      f" (or lower: rank {earliest} is the first tried)" if lowest < earliest else "")
  said = (f"separation at {where} vs the 2-bits-per-parameter threshold {threshold:.1f}: "
          f"ratio {low:.2f}" + ("" if high == low else " or more" if math.isinf(high) else
                                f"-{high:.2f}") + f" (gaps to FullFT: "
          f"{gaps_text} bits/answer, margin {margin:g}; {_seeds(*done.values())})")
  if 1 / factor <= low and high <= factor:
    return Verdict(REPRODUCED, f"{said} (within {factor:g}x)")
  if low > factor or high < 1 / factor:
    return Verdict(NOT_REPRODUCED, f"{said} (outside {factor:g}x)")
  return Verdict(INCONCLUSIVE, f"{said}: which rank separates is not pinned down, and the "
                 f"range crosses {factor:g}x")


def matches(diff: Estimate | None, tol: float, what: str, low_rank: Estimate | None = None,
            full: Estimate | None = None) -> Verdict:
  """RL: ``diff`` is rank 1's final ``what`` minus FullFT's (seed by seed). Reproduced when
  rank 1 is confidently no more than ``tol`` below FullFT (diff - 2 s.e. >= -tol); not
  reproduced when it is confidently more than ``tol`` below (diff + 2 s.e. < -tol);
  inconclusive in between."""
  if diff is None:
    return Verdict(INCONCLUSIVE, "an arm diverged or did not finish")
  arms = ("" if low_rank is None or full is None else
          f"rank 1 {low_rank.format('.4g')}, FullFT {full.format('.4g')}; ")
  said = (f"{what}: {arms}rank 1 minus FullFT {diff.format('+.4g')} (tolerance {tol:g}; "
          f"{_seeds(diff)})")
  if diff.mean - diff.noise >= -tol:
    return Verdict(REPRODUCED, said)
  if diff.mean + diff.noise < -tol:
    return Verdict(NOT_REPRODUCED, said)
  return Verdict(INCONCLUSIVE, said + ": within 2 standard errors of the tolerance")
