"""Several runs over one base in one step (``jlora train A.toml B.toml ...``): what they
must share (``check``), how an objective trains its runs together (``Group``), and the
trainer that stacks their adapters (``Stacked``: ``jlora.core.stack``).

Each run keeps everything a solo run has: its own directory, config, metrics,
checkpoints (its own state as its solo run holds it: ``stack.solo_state``), summary and
adapters, so ``jlora export`` / ``merge`` / ``generate`` / ``--resume`` work on it alone.
What they share is the base and everything that shapes the base's computation
(``SHARED``). Where this sits in a run: docs/ARCHITECTURE.md, "Many adapters, one base".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jlora import models
from jlora.core import sharding, stack
from jlora.infra import fs, mesh as mesh_lib
from jlora.run import config as config_lib, plug, train_step

# The keys every run of a group shares: the base model and what shapes its computation
# (and the batch's layout). Each run may differ in the rest: LoRA rank, alpha, targets,
# LR and schedule, steps, data source and seed, batch rows, lora.init, evaluation.
SHARED = ("model", "mesh", "data.seq_len", "data.pack", "train.loss_chunk",
          "train.grad_accum")


def shared_values(values: dict, key: str) -> Any:
  """The value of a dotted key (``SHARED``'s ``"data.seq_len"``, a section's ``"model"``)
  in a config's nested dict."""
  for part in key.split("."):
    values = values[part]
  return values


def _flat(values: Any, key: str) -> dict[str, Any]:
  if not isinstance(values, dict):
    return {key: values}
  return {k: v for name, inner in values.items() for k, v in _flat(inner, f"{key}.{name}").items()}


def check(cfgs: Sequence[config_lib.RunConfig], names: Sequence[str],
          keys: Sequence[str] = SHARED, doing: str = "train") -> None:
  """One-line ValueError naming the run and the key when runs cannot be ``doing``
  ("train", "generate") together: a shared key (``keys``: ``SHARED`` for training, the
  model for answering) that differs, full fine-tuning, ``lora.full``, and for training
  two runs in one directory. Reads nothing but the configs."""
  values = cfgs[0].to_dict()
  first = {k: v for key in keys for k, v in _flat(shared_values(values, key), key).items()}
  dirs: dict[str, str] = {}
  for cfg, name in zip(cfgs, names):
    if cfg.train.method != "lora":
      raise ValueError(f"{name}: train.method = {cfg.train.method!r}: only LoRA runs "
                       f"{doing} together (their adapters share one base); {doing} it alone")
    if cfg.lora.full:
      raise ValueError(f"{name}: lora.full = {list(cfg.lora.full)} trains parameters in "
                       f"full, which each run would need its own copy of; {doing} it alone")
    for key in keys:
      for k, v in _flat(shared_values(cfg.to_dict(), key), key).items():
        if v != first[k]:
          raise ValueError(f"{name}: {k} = {v!r}, but {names[0]} has {first[k]!r}: runs "
                           f"that {doing} together share {', '.join(keys)}")
    run_dir = fs.absolute(cfg.run_dir)
    if run_dir in dirs and doing == "train":
      raise ValueError(f"{name}: run_dir {cfg.run_dir!r} is also {dirs[run_dir]}'s: each run "
                       "needs its own directory")
    dirs[run_dir] = name


def stackable(s, doing: str) -> None:
  """One-line ValueError when a built run's adapters cannot join a stack over the shared
  base (``doing`` them together: "train", "generate"): a ``lora.init`` adapter with
  modules_to_save (parameters of its own in full), adapters on MoE experts (not yet)."""
  if s.spec.full:
    raise ValueError(f"lora.init's adapter trains {', '.join(s.spec.full)} in full, "
                     f"which each run would need its own copy of; {doing} it alone")
  if experts := [p for p, t in s.plan.targets.items() if "e" in t.layout]:
    raise ValueError(f"adapters on MoE experts ({experts[0]}) do not {doing} with other "
                     f"runs' yet; {doing} it alone, or leave the experts out of "
                     "lora.targets")


class GroupBatches:
  """The batches of runs trained together (``jlora.run.group``): each run's rows from its
  own source, as one global batch of ``micro`` micro-batches (a multiple of the runs),
  micro-batch m (rows m, m + micro, ...: ``train_step.make_step``) holding only run
  m % N's rows, with ``"adapter"`` = its index on every row. A run with fewer rows than the
  most is padded with rows of weight 0 (``mask`` 0: exact, paid in compute). Positions stay
  with the runs' sources (each run's checkpoints hold its own)."""

  def __init__(self, sources: list[plug.DataBatches], mesh, micro: int):
    self.sources, self._mesh, self.micro = sources, mesh, micro

  def next(self, state) -> dict:
    del state
    return combine([source.rows() for source in self.sources], self._mesh, self.micro)

  def metrics(self) -> dict:
    return {}

  def get_state(self) -> dict:
    return {"runs": [source.get_state() for source in self.sources]}

  def set_state(self, state: dict) -> None:
    for source, own in zip(self.sources, state["runs"]):
      source.set_state(own)

  def close(self) -> None:
    pass  # each run closes its own source


def combine(parts: list[dict], mesh, micro: int) -> dict:
  """Runs' host batches (``parts[i]``: run i's rows, every field the same width across
  runs) as one global batch of ``micro`` micro-batches of one run each (``GroupBatches``):
  each run padded to the most rows with masked rows, ``"adapter"`` set, rows interleaved."""
  most = max(len(p["inputs"]) for p in parts)
  parts = [{**_padded(p, most), "adapter": np.full(most, i, np.int32)}
           for i, p in enumerate(parts)]
  per = micro // len(parts)
  return mesh_lib.global_batch({k: _interleave([p[k] for p in parts], per) for k in parts[0]},
                               mesh)


def _padded(batch: dict, rows: int) -> dict:
  """``batch`` grown to ``rows`` rows by repeating its rows with ``mask`` 0."""
  have = len(batch["inputs"])
  if have == rows:
    return batch
  take = np.arange(rows) % have
  out = {k: v[take] for k, v in batch.items()}
  kept = (np.arange(rows) < have).reshape(-1, *[1] * (batch["mask"].ndim - 1))
  out["mask"] = np.where(kept, out["mask"], 0).astype(batch["mask"].dtype)
  return out


def _interleave(runs: list[np.ndarray], per: int) -> np.ndarray:
  """Runs' rows (each [rows, ...], rows divisible by ``per``) laid out for ``N * per``
  micro-batches of one run each: run i's row j * rows / per + q goes to global row
  q * N * per + j * N + i, which ``make_step`` puts in micro-batch j * N + i."""
  rows, rest = runs[0].shape[0], runs[0].shape[1:]
  x = np.stack([r.reshape(per, rows // per, *rest) for r in runs], axis=1)  # [j, i, q, ...]
  return np.moveaxis(x, 2, 0).reshape(len(runs) * rows, *rest)  # [q, j, i, ...]


@dataclasses.dataclass(frozen=True)
class Group:
  """How an objective trains several runs in one step (``driver.Kind.group``).

  Attributes:
    batches: a run's ``build.Setup`` -> its own batch source (``plug.DataBatches``: its
      rows, its position).
    make: (setups, ``stack.Stack``, their sources, micro) -> the group's
      ``plug.Objective``: a loss with one total and count per adapter over the micro-batches
      of ``GroupBatches(sources, mesh, micro)`` (``lm.stacked_lm_loss``), and
      ``evaluate`` / ``eval_loss`` taking (trainable, which runs) and returning one dict
      per run asked.
    shared: the objective's own keys its runs must share (RL: one decode, one loss).
    rows: a run's rows per step (a run's tokens in the metrics).
  """
  batches: Callable[[Any], plug.DataBatches]
  make: Callable[[list, stack.Stack, list, int], plug.Objective]
  shared: tuple[str, ...] = ()  # keys the objective's runs share besides SHARED
  rows: Callable[[config_lib.RunConfig], int] = lambda cfg: cfg.data.batch_size


class Stacked:
  """The runs' adapters stacked over the one base they share (``stack.stack``), trained by
  one step with a per-adapter optimizer (``stack.optimizer``: each run's LR schedule,
  clipping, weight decay, LoRA+ ratio and step count): each run's trajectory is its solo
  run's (tests/run/test_train_step.py). The adapter axis is replicated, each factor
  sharded like its kernel (``sharding.stacked_adapter_shardings``).

  The step accumulates N x ``train.grad_accum`` micro-batches of one run each
  (``GroupBatches``; a run with fewer rows padded with masked rows), each a solo
  step's rows through one adapter (``stack.with_adapter``), so the step holds one
  micro-batch's activations and does a solo step's work per token. Why not every run's rows
  through the model at once (``matmul.adapter_rows``, which the functional API and the
  group's answers use): on 2 CPU cores 32 rows through 8 stacked adapters at once ran 10%
  slower per token than 4 rows through one and held 8 batches' activations
  (bench/RESULTS.md "Many adapters, one base"), and on a sharded batch the row blocks
  need collective permutes that XLA:CPU's threaded runtime deadlocked on (8 host devices)."""

  def __init__(self, group: Group):
    self.group = group
    self.members: list[plug.Member] = []
    self.st: stack.Stack | None = None
    self.objective: plug.Objective | None = None

  def build(self, members, states):
    s = members[0].s
    self.members = members
    self.st = stack.stack(s.frozen, [m.s.plan for m in members])
    micro = len(members) * s.cfg.train.grad_accum
    self.objective = self.group.make([m.s for m in members], self.st,
                                     [m.batches for m in members], micro)
    trains = [m.s.cfg.train for m in members]
    tx = stack.optimizer(self.st, [m.s.lr_schedule for m in members],
                         b_lr_ratios=[t.b_lr_ratio for t in trains],
                         weight_decays=[t.weight_decay for t in trains],
                         max_grad_norms=[t.grad_clip or None for t in trains])
    state = stack.stacked_state(states, self.st)
    specs = sharding.logical_specs(models.abstract_params(s.model))
    lora = jax.device_put(state["trainable"]["lora"],
                          sharding.stacked_adapter_shardings(self.st, specs, s.mesh))
    state = {**state, "trainable": {"lora": lora, "full": {}}}
    return train_step.build(self.objective.loss, tx, state["trainable"],
                            plug.frozen_of(self.objective, s), s.mesh, micro,
                            adapter_axes=stack.adapter_axes(self.st), state=state)

  def next(self, state):
    return self.objective.batches.next(state)

  def own(self, state, j):
    return stack.solo_state(state, self.st, j, self.members[j].template["opt_state"])

  def pick(self, metrics, j):
    return {k: np.asarray(v)[j] if np.ndim(v) else v for k, v in metrics.items()}

  def tokens(self, batch, j):
    return self.group.rows(self.members[j].s.cfg) * batch["inputs"].shape[1]

  def evaluate(self, trainable, which, full):
    found = (self.objective.evaluate if full else self.objective.eval_loss)(trainable, which)
    return list(found)
