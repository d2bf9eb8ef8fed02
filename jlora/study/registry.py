"""What a study is: the declaration (``Study``) each study module registers, what it is
given (``Context``) and what it returns (``StudyPlan`` to train, ``Outcome`` to report). The
studies themselves (``layers_study``, ``lr_study``, ``rank_study``, ``batch_study``,
``capacity``, ``compute``, ``rl_study``) import this module and register;
``jlora.study.run`` imports them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from jlora.run import build, driver, parsing
from jlora.study import runner, verdicts

BUDGETS = ("smoke", "small", "full")


@dataclasses.dataclass
class Context:
  """What a study is given: its budget, output directory, the user's model and ``--set``
  overrides (applied to every arm's config, under the arm's own overrides)."""
  name: str
  budget: str
  out: str
  model: str | None = None
  overrides: Sequence[str] = ()
  log: Callable[[str], None] = print
  seeds: int = 1  # each arm trained at this many seeds (``runner.seeded``)

  def pick(self, smoke, small, full):
    return {"smoke": smoke, "small": small, "full": full}[self.budget]

  def plan(self, values: dict, arms: list[runner.Arm], **info) -> "StudyPlan":
    """A validated plan: ``--set`` applied to ``values``; every arm's config resolves
    (unknown keys, bad values: one line) and the first passes the run's preflight."""
    values = parsing.apply_overrides(values, list(self.overrides))
    configs = [runner.arm_config(values, arm, self.out)[0] for arm in arms]
    if configs:
      build.preflight(configs[0], driver.kind_of(configs[0]).rules)
    return StudyPlan(values, arms, info)

  def train(self, plan: "StudyPlan") -> list[runner.ArmResult]:
    """Every arm of ``plan`` at ``seeds`` seeds (one, where ``plan.info["seeded"]`` is
    False: a stage that prepares rather than measures); every seed's result
    (``runner.by_arm`` groups them)."""
    seeds = self.seeds if plan.info.get("seeded", True) else 1
    return runner.run_arms(self.name, runner.seeded(plan.arms, plan.values, seeds),
                           plan.values, self.out, log=self.log,
                           keep_checkpoints=plan.info.get("keep_checkpoints", False))


@dataclasses.dataclass
class StudyPlan:
  values: dict  # the base run config (nested dict) every arm starts from
  arms: list[runner.Arm]
  info: dict = dataclasses.field(default_factory=dict)  # what analyse needs besides results


@dataclasses.dataclass
class Outcome:
  verdict: verdicts.Verdict
  measured: list[str]  # sentences: what was measured, with the key numbers
  table: list[dict]
  plots: list[str | None]
  headline: str  # jlora's measurement in one line (the README's table)
  notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  title: str
  claim: str
  figure: str  # the post's figure or statement this mirrors
  rule: str  # the verdict rule, as the report states it
  prepare: Callable[[Context], StudyPlan | None]  # validates; None: no training arms
  analyse: Callable[[Context, StudyPlan | None, list[runner.ArmResult]], Outcome]


STUDIES: dict[str, Study] = {}


def register(study: Study) -> Study:
  STUDIES[study.name] = study
  return study

