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


def test_lr_ratio_rule():
  full = _opt(1e-4)
  assert verdicts.lr_ratio({"r4": _opt(1e-3), "r32": _opt(1.5e-3)}, full).outcome == REPRODUCED
  assert verdicts.lr_ratio({"r4": _opt(1e-4)}, full).outcome == NOT_REPRODUCED  # 1x
  assert verdicts.lr_ratio({"r4": _opt(1e-3), "r32": _opt(4e-3)}, full).outcome == \
      NOT_REPRODUCED  # one rank at 40x
  assert verdicts.lr_ratio({"r4": _opt(1e-3, False)}, full).outcome == INCONCLUSIVE
  assert verdicts.lr_ratio({"r4": None}, full).outcome == INCONCLUSIVE


def test_layers_rule():
  assert verdicts.layers(3.00, 2.90, 2.895, 0.01).outcome == REPRODUCED
  assert verdicts.layers(2.80, 2.90, 2.90, 0.01).outcome == NOT_REPRODUCED  # attn better
  assert verdicts.layers(3.00, 2.90, 2.80, 0.01).outcome == NOT_REPRODUCED  # mlp << all
  assert verdicts.layers(3.00, 2.90, 3.10, 0.01).outcome == NOT_REPRODUCED  # all << mlp
  assert verdicts.layers(2.905, 2.90, 2.90, 0.01).outcome == INCONCLUSIVE
  assert verdicts.layers(None, 2.9, 2.9, 0.01).outcome == INCONCLUSIVE


def _curves(final_by_rank, early_spread=0.0):
  """Synthetic curves: equal (up to ``early_spread``, growing with rank) for 10 steps."""
  out = {}
  for k, r in enumerate(final_by_rank):
    out[r] = [(s, 3.0 - 0.05 * s + early_spread * k) for s in range(1, 11)]
  return out


def test_rank_rule():
  final = {1: 2.6, 4: 2.5, 16: 2.45}
  assert verdicts.rank(_curves(final), final, 5, 0.02, 0.01).outcome == REPRODUCED
  wide = _curves(final, early_spread=0.2)  # ranks apart from the first updates
  assert verdicts.rank(wide, final, 5, 0.02, 0.01).outcome == NOT_REPRODUCED
  flat = {1: 2.5, 4: 2.5, 16: 2.5}
  assert verdicts.rank(_curves(flat), flat, 5, 0.02, 0.01).outcome == INCONCLUSIVE
  backwards = {1: 2.4, 4: 2.5, 16: 2.6}  # the highest rank ends worst
  assert verdicts.rank(_curves(backwards), backwards, 5, 0.02, 0.01).outcome == \
      NOT_REPRODUCED
  # Step 1 is before any update: a spread there is not held against the rule.
  c = _curves(final)
  c[16][0] = (1, 9.0)
  assert verdicts.rank(c, final, 5, 0.02, 0.01).outcome == REPRODUCED


def test_batch_flops_capacity_and_rl_rules():
  assert verdicts.batch({2: 0.00, 8: 0.02, 32: 0.08}, 0.01).outcome == REPRODUCED
  assert verdicts.batch({2: 0.08, 8: 0.02, 32: 0.00}, 0.01).outcome == NOT_REPRODUCED
  assert verdicts.batch({2: 0.01, 32: 0.015}, 0.01).outcome == INCONCLUSIVE
  assert verdicts.flop_ratio(0.69).outcome == REPRODUCED
  assert verdicts.flop_ratio(0.90).outcome == NOT_REPRODUCED
  assert verdicts.flop_ratio(0.60).outcome == NOT_REPRODUCED
  assert verdicts.capacity(4, 3.0).outcome == REPRODUCED
  assert verdicts.capacity(16, 3.0).outcome == NOT_REPRODUCED
  assert verdicts.capacity(None, 3.0).outcome == INCONCLUSIVE
  assert verdicts.matches(0.50, 0.52, 0.05, "accuracy").outcome == REPRODUCED
  assert verdicts.matches(0.30, 0.52, 0.05, "accuracy").outcome == NOT_REPRODUCED
