"""Where objectives and trainers plug into the run loop (``jlora.run.loop``).

An objective (``jlora.objectives``: SFT, DPO, RL) hands the loop an ``Objective``: its
loss, a ``Batches`` source and its held-out evaluation. The loop drives ``Member``s, one
per run with its own directory, checkpoints and batch source, and a ``Trainer`` says how
one step trains them: ``Alone`` (one run) or ``jlora.run.group.Stacked`` (several runs'
adapters stacked over one base). ``Result`` is what a run hands back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

from jlora.infra import mesh as mesh_lib
from jlora.run import checkpoint, metrics as metrics_lib, train_step


class Batches(Protocol):
  """A batch source: ``next(state)`` gives the next global batch (it may sample from the
  current policy); its position round-trips through JSON for checkpoints."""

  def next(self, state: Any) -> Any: ...
  def metrics(self) -> dict: ...  # host-side metrics of the last batch (e.g. rewards)
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...
  def close(self) -> None: ...


class DataBatches:
  """Batches from a data pipeline iterator (``jlora.data.dataset``): each process's rows
  assembled into global arrays on the mesh."""

  def __init__(self, iterator, mesh):
    self._it, self._mesh = iterator, mesh

  def next(self, state) -> dict:
    del state  # supervised data does not depend on the model
    return mesh_lib.global_batch(self.rows(), self._mesh)

  def rows(self) -> dict:
    """This process's rows of the next batch (host arrays)."""
    return next(self._it)

  def metrics(self) -> dict:
    return {}

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)

  def close(self) -> None:
    if hasattr(self._it, "close"):
      self._it.close()


@dataclasses.dataclass
class Objective:
  """What an objective plugs into the loop.

  Attributes:
    loss: ``loss(trainable, frozen, batch) -> (sum, count[, aux])`` (``train_step.make_step``).
    batches: where batches come from (``Batches``).
    evaluate: trainable -> held-out metrics, run before and after training (a group's
      objective: (trainable, which runs) -> their metrics, a dict each).
    eval_loss: trainable -> the cheaper metrics run every ``eval.every`` steps (a group's:
      as ``evaluate``).
    fields: extra metric names for metrics.csv (JSONL and TensorBoard take them all).
    frozen: what the loss gets as ``frozen`` when that is more than the run's frozen base
      (None: the base; preference tuning: the base and its reference's adapter). Passed
      to the step as an argument, never baked into the program.
  """
  loss: train_step.LossFn
  batches: Batches
  evaluate: Callable[[Any], dict]
  eval_loss: Callable[[Any], dict]
  fields: tuple[str, ...] = ()
  frozen: Any = None


@dataclasses.dataclass
class Result:
  state: Any
  first: int  # the step this invocation started from
  before: dict  # held-out metrics before training
  after: dict  # and after
  last: dict | None  # the last logged row
  stored_bytes: int | None  # arrays in the last checkpoint


@dataclasses.dataclass
class Member:
  """One run in the step loop: trained alone (``run``) or one of a group training in the
  same step (``run_members``). Its own directory, checkpoints, metrics, batch source and
  progress, and how far it has got."""
  s: Any  # its build.Setup
  run_dir: str
  batches: Batches  # its own batch source: its position is in its checkpoints
  fields: tuple[str, ...] = ()  # its objective's extra metric names
  template: Any = None  # its fresh state, abstract: the restore target and its saved layout
  ckpts: checkpoint.Checkpoints | None = None
  metrics_out: metrics_lib.Metrics | None = None
  first: int = 0  # the step this invocation started it from
  n: int = 0  # steps done
  good: int = 0  # the last logged step that was finite
  seen_tokens: int = 0  # tokens since the throughput clock started
  before: dict = dataclasses.field(default_factory=dict)
  after: dict = dataclasses.field(default_factory=dict)
  last: dict | None = None
  state: Any = None  # its state when it left the step
  stored_bytes: int | None = None
  error: Exception | None = None  # a group's run that diverged (loop.NonFiniteLoss)
  bar: Any = None

  @property
  def steps(self) -> int:
    return self.s.cfg.train.steps

  def result(self) -> Result:
    return Result(self.state, self.first, self.before, self.after, self.last,
                  self.stored_bytes)


class Trainer(Protocol):
  """How the runs of one step train: ``Alone`` (one run: its objective's loss, its
  optimizer, its state) or several runs' adapters stacked over one base
  (``jlora.run.group.Stacked``)."""

  objective: Objective | None  # what it trains (set by ``build`` for a group)

  def build(self, members: list[Member], states: list) -> tuple[Callable, Any]:
    """(the jitted step, its state) for these runs, from each run's own state."""
    ...

  def next(self, state: Any) -> Any: ...  # the next batch: every run's rows
  def own(self, state: Any, j: int) -> Any: ...  # run j's state as its solo run holds it
  def pick(self, metrics: dict, j: int) -> dict: ...  # run j's step metrics (on the host)
  def tokens(self, batch: Any, j: int) -> int: ...  # run j's tokens in a batch

  def evaluate(self, trainable: Any, which: list[int], full: bool) -> list[dict]:
    """Held-out metrics of runs ``which``: all of them (``full``) or the cheaper loss."""
    ...


class Alone:
  """One run's step: the objective's loss, the run's optimizer, the run's state."""

  def __init__(self, objective: Objective):
    self.objective = objective

  def build(self, members, states):
    s = members[0].s
    return train_step.build(self.objective.loss, s.tx, states[0]["trainable"],
                            frozen_of(self.objective, s), s.mesh, s.cfg.train.grad_accum,
                            state=states[0])

  def next(self, state):
    return self.objective.batches.next(state)

  def own(self, state, j):
    return state

  def pick(self, metrics, j):
    return metrics

  def tokens(self, batch, j):
    return batch["inputs"].size if "inputs" in batch else 0

  def evaluate(self, trainable, which, full):
    return [(self.objective.evaluate if full else self.objective.eval_loss)(trainable)]


def frozen_of(objective: Objective, s) -> Any:
  """What the step's loss gets as ``frozen``: the objective's own, else the run's base."""
  return s.frozen if objective.frozen is None else objective.frozen


