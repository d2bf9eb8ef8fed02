"""jlora.study.verdicts: the verdict rules and the LR fit on synthetic numbers (each rule must
be able to say "not reproduced")."""

import math

import pytest

from jlora.study import verdicts
from jlora.study.verdicts import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


def _parabola(lrs, best, curvature=0.3, floor=2.0):
  return [floor + curvature * (math.log10(lr) - math.log10(best)) ** 2 for lr in lrs]


def test_lr_optimum_recovers_the_vertex_of_a_parabola_in_log_lr():
  grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
  for best in (2e-4, 7e-4, 1.3e-3, 5e-3):
    o = verdicts.lr_optimum(grid, _parabola(grid, best))
    assert o.bracketed and o.fitted
    assert o.lr == pytest.approx(best, rel=1e-9)
    assert o.loss == min(_parabola(grid, best))


def test_lr_optimum_at_the_grid_edge_is_not_bracketed_and_diverged_arms_count_as_worst():
  grid = [1e-4, 3e-4, 1e-3, 3e-3]
  o = verdicts.lr_optimum(grid, _parabola(grid, 1e-5))
  assert (o.lr, o.bracketed, o.fitted) == (1e-4, False, False)
  # A diverged neighbour (None / NaN) is worse than any finite loss: it brackets the best
  # point, but no parabola goes through it.
  grid = [1e-3, 3e-3, 1e-2]
  o = verdicts.lr_optimum(grid, [2.5, 2.1, None])
  assert (o.lr, o.bracketed, o.fitted) == (3e-3, True, False)
  assert verdicts.lr_optimum(grid, [float("nan")] * 3) is None
  # Order of the points does not matter.
  o = verdicts.lr_optimum([1e-2, 1e-4, 1e-3], _parabola([1e-2, 1e-4, 1e-3], 8e-4))
  assert o.lr == pytest.approx(8e-4, rel=1e-9)


def _opt(lr, bracketed=True):
  return verdicts.Optimum(lr, 2.0, bracketed, bracketed)


def E(mean, se=None, n=None):  # noqa: N802
  """An estimate: one seed (no s.e.) or three."""
  return verdicts.Estimate(mean, se, n or (1 if se is None else 3))


def test_estimates_and_paired_differences_against_statistics():
  import statistics
  values = [3.91, 3.87, 3.95, 3.90]
  e = verdicts.estimate(values)
  assert e.mean == pytest.approx(statistics.mean(values))
  assert e.se == pytest.approx(statistics.stdev(values) / 2)
  assert verdicts.estimate([2.5]) == verdicts.Estimate(2.5, None, 1)
  assert verdicts.estimate([2.5, None]) is None and verdicts.estimate([math.nan]) is None
  a, b = {0: 3.0, 1: 3.2, 2: 2.9}, {0: 2.9, 1: 3.15, 2: 2.7, 3: 9.9}  # seed 3: b only
  d = verdicts.paired(a, b)
  diffs = [0.1, 0.05, 0.2]
  assert (d.n, d.mean) == (3, pytest.approx(statistics.mean(diffs)))
  assert d.se == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
  assert verdicts.paired({0: 1.0}, {1: 1.0}) is None
  assert str(E(0.1234, 0.0456)) == "+0.1234 ± 0.0456" and str(E(-0.5)) == "-0.5000"


def test_lr_ratio_rule():
  one = lambda *os: dict(enumerate(os))  # noqa: E731  {seed: optimum}
  full = one(_opt(1e-4))
  assert verdicts.lr_ratio({"r4": one(_opt(1e-3)), "r32": one(_opt(1.5e-3))}, full).outcome \
      == REPRODUCED
  assert verdicts.lr_ratio({"r4": one(_opt(1e-4))}, full).outcome == NOT_REPRODUCED  # 1x
  assert verdicts.lr_ratio({"r4": one(_opt(1e-3)), "r32": one(_opt(4e-3))}, full).outcome == \
      NOT_REPRODUCED  # one rank at 40x
  assert verdicts.lr_ratio({"r4": one(_opt(1e-3, False))}, full).outcome == INCONCLUSIVE
  assert verdicts.lr_ratio({"r4": one(None)}, full).outcome == INCONCLUSIVE
  # Three seeds: ratios 9-11x agree (reproduced); 3x, 10x, 30x is noise across a bound
  # (inconclusive: the geometric mean alone, 9.7x, would say reproduced); 0.9-1.1x is
  # clearly outside.
  full3 = one(_opt(1e-4), _opt(2e-4), _opt(1e-4))
  seeds = lambda *ratios: {k: _opt(full3[k].lr * r) for k, r in enumerate(ratios)}  # noqa
  assert verdicts.lr_ratio({"r4": seeds(9, 10, 11)}, full3).outcome == REPRODUCED
  noisy = verdicts.lr_ratio({"r4": seeds(3, 10, 30)}, full3)
  assert noisy.outcome == INCONCLUSIVE and "r4 9.7x (2 s.e.: 2.6-36.5x)" in noisy.reason
  assert verdicts.lr_ratio({"r4": seeds(0.9, 1.0, 1.1)}, full3).outcome == NOT_REPRODUCED
  # paired by seed, not by position: LoRA lacks seed 1, so seed 2 meets FullFT's seed 2
  gappy = {0: _opt(1e-3), 2: _opt(1e-3)}
  v = verdicts.lr_ratio({"r4": gappy}, full3)
  assert "10.0x" in v.reason and "over 2 seeds" in v.reason


def test_layers_rule():
  # one seed: the tolerance alone
  assert verdicts.layers(E(0.10), E(0.005), 0.01).outcome == REPRODUCED
  assert verdicts.layers(E(-0.10), E(0.0), 0.01).outcome == NOT_REPRODUCED  # attn better
  assert verdicts.layers(E(0.10), E(0.10), 0.01).outcome == NOT_REPRODUCED  # mlp >> all
  assert verdicts.layers(E(0.10), E(-0.20), 0.01).outcome == NOT_REPRODUCED  # all >> mlp
  assert verdicts.layers(E(0.005), E(0.0), 0.01).outcome == INCONCLUSIVE
  assert verdicts.layers(None, E(0.0), 0.01).outcome == INCONCLUSIVE
  # with noise: the same means decide differently
  assert verdicts.layers(E(0.10, 0.01), E(0.002, 0.002), 0.01).outcome == REPRODUCED
  assert verdicts.layers(E(0.10, 0.06), E(0.002, 0.002), 0.01).outcome == INCONCLUSIVE
  assert verdicts.layers(E(0.10, 0.01), E(0.005, 0.004), 0.01).outcome == INCONCLUSIVE
  assert verdicts.layers(E(0.10, 0.01), E(0.05, 0.01), 0.01).outcome == NOT_REPRODUCED
  assert verdicts.layers(E(0.10, 0.01), E(0.05, 0.03), 0.01).outcome == INCONCLUSIVE
  assert verdicts.layers(E(-0.05, 0.01), E(0.0, 0.001), 0.01).outcome == NOT_REPRODUCED
  assert verdicts.layers(E(-0.05, 0.03), E(0.0, 0.001), 0.01).outcome == INCONCLUSIVE


def _curves(final_by_rank, early_spread=0.0):
  """Synthetic curves: equal (up to ``early_spread``, growing with rank) for 10 steps."""
  out = {}
  for k, r in enumerate(final_by_rank):
    out[r] = [(s, 3.0 - 0.05 * s + early_spread * k) for s in range(1, 11)]
  return out


def test_rank_rule():
  ranks = {1: None, 4: None, 16: None}
  spread = lambda e: verdicts.early_spread(_curves(ranks, e), 5)  # noqa: E731
  assert spread(0.0) == 0.0
  assert spread(0.03) == pytest.approx(0.06 / (2.75 + 0.03))  # step 5: the largest
  c = _curves(ranks)
  c[16][0] = (1, 9.0)  # step 1 is before any update: not held against the rule
  assert verdicts.early_spread(c, 5) == 0.0
  rule = lambda s, d: verdicts.rank(s, d, 5, 0.02, 0.01, (1, 16)).outcome  # noqa: E731
  # one seed: the tolerances alone
  assert rule(E(0.01), E(0.15)) == REPRODUCED
  assert rule(E(0.07), E(0.15)) == NOT_REPRODUCED  # ranks apart from the first updates
  assert rule(E(0.01), E(0.0)) == INCONCLUSIVE  # no rank falls off
  assert rule(E(0.01), E(-0.2)) == NOT_REPRODUCED  # the highest rank ends worst
  assert rule(None, E(0.15)) == INCONCLUSIVE
  # with noise: the same means decide differently
  assert rule(E(0.01, 0.002), E(0.05, 0.01)) == REPRODUCED
  assert rule(E(0.01, 0.002), E(0.05, 0.03)) == INCONCLUSIVE  # drop within 2 s.e. of 0
  assert rule(E(0.01, 0.002), E(-0.05, 0.03)) == INCONCLUSIVE
  assert rule(E(0.01, 0.002), E(-0.05, 0.01)) == NOT_REPRODUCED
  assert rule(E(0.025, 0.01), E(0.05, 0.01)) == INCONCLUSIVE  # spread across 2% at 2 s.e.
  assert rule(E(0.015, 0.005), E(0.05, 0.01)) == INCONCLUSIVE  # interval reaches 2.5%
  assert rule(E(0.05, 0.01), E(0.05, 0.01)) == NOT_REPRODUCED  # clearly above 2%


def test_batch_flops_capacity_and_rl_rules():
  gaps = {2: E(0.0), 32: E(0.08)}
  assert verdicts.batch(gaps, E(0.08), 0.01).outcome == REPRODUCED
  assert verdicts.batch(gaps, E(-0.08), 0.01).outcome == NOT_REPRODUCED
  assert verdicts.batch(gaps, E(0.005), 0.01).outcome == INCONCLUSIVE
  assert verdicts.batch(gaps, E(0.08, 0.02), 0.01).outcome == REPRODUCED
  assert verdicts.batch(gaps, E(0.08, 0.05), 0.01).outcome == INCONCLUSIVE
  assert verdicts.batch(gaps, E(-0.08, 0.05), 0.01).outcome == INCONCLUSIVE
  assert verdicts.batch({2: E(0.0), 32: None}, E(0.08), 0.01).outcome == INCONCLUSIVE
  assert verdicts.flop_ratio(0.69).outcome == REPRODUCED
  assert verdicts.flop_ratio(0.90).outcome == NOT_REPRODUCED
  assert verdicts.flop_ratio(0.60).outcome == NOT_REPRODUCED
  curve = {1: E(3.0, 0.1), 2: E(1.5, 0.1), 4: E(0.2, 0.05), 8: E(0.1, 0.05)}
  assert verdicts.capacity(curve, 3.0, 0.5).outcome == REPRODUCED  # separates at 4
  assert verdicts.capacity(curve, 12.0, 0.5).outcome == NOT_REPRODUCED  # 4 vs 12: 3x off
  assert verdicts.capacity({1: E(3.0), 2: E(1.5)}, 3.0, 0.5).outcome == INCONCLUSIVE
  # rank 4's gap within 2 s.e. of the margin: separation at rank 4 or 8
  unsure = {**curve, 4: E(0.45, 0.1)}
  assert verdicts.capacity(unsure, 3.0, 0.5).outcome == INCONCLUSIVE  # 1.3-2.7x: crosses 2x
  assert verdicts.capacity(unsure, 5.0, 0.5).outcome == REPRODUCED  # 0.8-1.6x
  assert verdicts.capacity(unsure, 1.0, 0.5).outcome == NOT_REPRODUCED  # 4-8x
  # the last rank not clearly within: the separation may lie beyond the ranks tried
  beyond = {1: E(5.4, 0.15), 2: E(3.35, 0.09), 4: E(0.96, 0.03), 8: E(0.28, 0.19)}
  v = verdicts.capacity(beyond, 1.5, 0.5)
  assert v.outcome == NOT_REPRODUCED and "rank 8 or above" in v.reason  # >= 5.3x
  assert verdicts.capacity(beyond, 6.0, 0.5).outcome == INCONCLUSIVE  # 1.3x or more
  assert verdicts.capacity({**curve, 4: E(0.45)}, 3.0, 0.5).outcome == REPRODUCED  # one seed
  # a rank below the separation that did not finish: the separation could lie there
  assert verdicts.capacity({**curve, 2: None}, 3.0, 0.5).outcome == INCONCLUSIVE
  assert verdicts.capacity({**curve, 16: None}, 3.0, 0.5).outcome == REPRODUCED  # above
  # the first rank tried is already within the margin: the separation may be lower, down
  # to rank 1 (0.33x of a threshold of 3: not pinned down within 2x)
  early = {2: E(0.1, 0.05), 4: E(0.05, 0.05)}
  v = verdicts.capacity(early, 3.0, 0.5)
  assert v.outcome == INCONCLUSIVE and "or lower" in v.reason
  assert verdicts.capacity(early, 1.5, 0.5).outcome == REPRODUCED  # ranks 1-2: 0.67-1.33x
  assert verdicts.matches(E(-0.02), 0.05, "accuracy").outcome == REPRODUCED
  assert verdicts.matches(E(-0.22), 0.05, "accuracy").outcome == NOT_REPRODUCED
  assert verdicts.matches(E(-0.01, 0.01), 0.05, "accuracy").outcome == REPRODUCED
  assert verdicts.matches(E(-0.06, 0.03), 0.05, "accuracy").outcome == INCONCLUSIVE
  assert verdicts.matches(E(-0.02, 0.03), 0.05, "accuracy").outcome == INCONCLUSIVE
  assert verdicts.matches(E(-0.20, 0.02), 0.05, "accuracy").outcome == NOT_REPRODUCED
  assert verdicts.matches(None, 0.05, "accuracy").outcome == INCONCLUSIVE
