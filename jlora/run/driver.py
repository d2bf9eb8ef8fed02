"""One run of any objective, from a config: ``jlora train``, ``jlora rl`` and every arm of
a study go through ``run``. Everything knowable before training is checked before the run
directory is created, so a mistake is a ValueError that leaves nothing behind; a finished
run ends with ``summary.json`` (and, under LoRA, ``adapters.safetensors``). The order of a
run's pieces and what each does: docs/ARCHITECTURE.md, "A run, and where an objective
plugs in".

Objectives (``jlora.objectives``) register a ``Kind`` (``register``): their command, config
section, rules, loop objective and advice; nothing here imports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax

from jlora.findings import advisor
from jlora.infra import fs, multihost
from jlora.run import build, checkpoint, config as config_lib, events, group as group_lib
from jlora.run import loop, plug, rundir


@dataclasses.dataclass(frozen=True)
class Kind:
  """An objective as a run sees it.

  Attributes:
    name: the objective, in messages.
    command: its ``jlora`` subcommand (the CLI makes one per registered kind).
    help: that subcommand's one-line help; ``example`` a recipe for it.
    rules: what it decides before the build (``build.Rules``).
    make: a ``build.Setup`` -> the ``plug.Objective`` (loss, batches, held-out evaluation)
      the loop trains.
    section: its own config section (``config.Section``), or None for the objective of a
      config without one (supervised fine-tuning).
    advise: (run config, model config, data statistics, plan) -> the advisor's findings.
    group: how it trains several runs in one step (``run_group``), or None: not yet.
  """
  name: str
  command: str
  help: str
  example: str
  rules: build.Rules
  make: Callable[[build.Setup], plug.Objective]
  section: config_lib.Section | None = None
  advise: Callable[..., list] = advisor.advise_run
  group: group_lib.Group | None = None


# The registered objectives by command, in registration order (the CLI's order).
KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
  """Make ``kind`` a ``jlora`` command and its section a config key; returns it."""
  if kind.section is None and any(k.section is None and k.command != kind.command
                                  for k in KINDS.values()):
    raise ValueError(f"objective {kind.name!r}: only one objective runs configs without "
                     "a section of their own")
  if kind.section is not None:
    config_lib.register(kind.section)
  KINDS[kind.command] = kind
  return kind


def kind_of(cfg: config_lib.RunConfig) -> Kind:
  """The registered objective ``cfg`` is for: the one whose section it has, else the one
  without a section."""
  for kind in KINDS.values():
    if (kind.section.name in cfg.sections if kind.section else not cfg.sections):
      return kind
  raise ValueError(f"no objective is registered for a config with sections "
                   f"{sorted(cfg.sections)}")


def load(path: str, overrides=(), kind: Kind | None = None) -> config_lib.RunConfig:
  """A recipe read for ``kind``'s command: its section is added when the recipe has none
  (so its defaults apply); without ``kind``, as written."""
  section = kind.section.name if kind is not None and kind.section else None
  return config_lib.load(path, overrides, section)


def _check_kind(cfg: config_lib.RunConfig, objective: Kind) -> None:
  found = kind_of(cfg)
  if found is objective:
    return
  has = (f"has the section [{found.section.name}]" if found.section
         else f"has no section [{objective.section.name}]")
  raise ValueError(f"the config {has}: run it with jlora {found.command}")


def advise(cfg: config_lib.RunConfig, objective: Kind, pre: build.Preflight | None = None):
  """The advisor's findings for a run config, from the model config and a data sample (no
  weights are read, except a ``lora.init`` adapter's shapes need the base)."""
  _check_kind(cfg, objective)
  pre = pre or build.preflight(cfg, objective.rules)
  if cfg.lora.init is not None and cfg.train.method == "lora":
    plan = build.build(cfg, pre, log=lambda _: None).plan
  else:
    plan = build.abstract_plan(cfg, pre.model_cfg)
  return objective.advise(cfg, pre.model_cfg, pre.stats, plan), pre.stats


def _finished(cfg: config_lib.RunConfig, log) -> dict | None:
  """The summary of a run that already reached train.steps (a --resume with nothing to
  do: nothing is touched), else None."""
  run_dir = fs.absolute(cfg.run_dir)
  steps = checkpoint.steps(run_dir)
  summary = fs.join(run_dir, "summary.json")
  if not steps or steps[-1] < cfg.train.steps or not fs.is_file(summary):
    return None
  log(f"{run_dir} already finished at step {steps[-1]} (train.steps = {cfg.train.steps}): "
      "nothing to do; raise train.steps to train further")
  return fs.read_json(summary)


def run(cfg: config_lib.RunConfig, objective: Kind, *, resume: bool = False,
        progress: bool = True, log: Callable[[str], None] = print, force: bool = False,
        base: build.Base | None = None, on_row: Callable[[dict], None] | None = None,
        on_event: events.Listener | None = None) -> dict:
  """Train per ``cfg`` with ``objective`` (a registered ``Kind``: ``KINDS``);
  returns the summary (also written to RUN_DIR/summary.json). The advisor's report is
  printed first; an "error" finding stops the run unless ``force``. ``base``: a model
  already loaded (the arms of a study share one). ``on_row``: called with each metrics row
  as it is written (row 0: held-out metrics before training); ``on_event``: every
  ``events.Event`` (phases, rows, checkpoints). Raises ValueError for a user mistake,
  before anything is written."""
  _check_kind(cfg, objective)
  emit = on_event or events.ignore
  if on_row is not None:
    emit = events.both(emit, events.rows_to(on_row))
  if resume and (done := _finished(cfg, log)) is not None:
    return done
  pre = build.preflight(cfg, objective.rules)
  log(f"data: {pre.stats}")
  rundir.check(cfg, resume)
  emit(events.phase("load"))
  s = build.build(cfg, pre, log, base, emit)
  _advise_setup(objective, s, pre, force, log)
  made = objective.make(s)
  run_dir, lock = rundir.create(cfg, resume)
  try:
    result = loop.run(s, made, run_dir, resume=resume, log=log, progress=progress,
                      emit=emit)
    emit(events.phase("finish"))
    with checkpoint.storage_failures(run_dir):
      return _finish(s, run_dir, result)
  finally:
    lock.release()


@contextlib.contextmanager
def _naming(name: str):
  """A user mistake about one run of a group names the run."""
  try:
    yield
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from None


def run_group(cfgs: list[config_lib.RunConfig], objective: Kind, names: list[str], *,
              resume: bool = False, progress: bool = True,
              log: Callable[[str], None] = print, force: bool = False,
              on_event: events.Listener | None = None, base: build.Base | None = None
              ) -> list[dict | loop.NonFiniteLoss]:
  """Train the runs ``cfgs`` (named ``names`` in messages: their recipe files) together:
  one base loaded once, their adapters stacked in one step (``group.Stacked``). Each run's
  directory ends as its solo run's would (``run``); a run that finishes early leaves the
  step, and one whose loss goes non-finite stops alone (its ``NonFiniteLoss`` is its
  entry in the result) while the others go on. Returns each run's summary, in order.
  Every check of every run (the group's shared keys, preflight, run directory, advice) is
  done before any run directory is created: a mistake is one ValueError naming the run.
  ``base``: the model already loaded (``build.load_base(..., shared=True)``: a study's arms),
  not read again."""
  for cfg, name in zip(cfgs, names):
    with _naming(name):
      _check_kind(cfg, objective)
  if objective.group is None:
    raise ValueError(f"jlora {objective.command} trains one run at a time for now: give it "
                     "one config")
  if multihost.processes() > 1:
    raise ValueError("runs trained together run in one process for now: train a group "
                     "without --distributed, or each run alone with it")
  group_lib.check(cfgs, names, group_lib.SHARED + objective.group.shared)
  emit = on_event or events.ignore
  out: dict[int, dict | loop.NonFiniteLoss] = {}
  todo = []
  for i, cfg in enumerate(cfgs):
    if resume and (done := _finished(cfg, log)) is not None:
      out[i] = done
    else:
      todo.append(i)
  if todo:
    setups = _group_setups([cfgs[i] for i in todo], objective, [names[i] for i in todo],
                           resume, force, log, emit, base)
    out.update(zip(todo, _train_group(setups, objective, resume, progress, log, emit)))
  return [out[i] for i in range(len(cfgs))]


def _advise_setup(objective: Kind, s: build.Setup, pre: build.Preflight, force: bool,
                  log: Callable[[str], None]) -> None:
  """The advisor's report on what will train; an error stops here unless ``force``."""
  findings = objective.advise(s.cfg, s.model_cfg, pre.stats, s.plan)
  log(advisor.report(findings))
  if advisor.has_error(findings) and not force:
    raise ValueError("the advisor found an error (ERROR line above): fix the config, or "
                     "pass --force to train anyway")
  log(f"model {s.cfg.model.path}: {build.describe(s)}")


def _group_setups(cfgs, objective: Kind, names, resume: bool, force: bool, log,
                  emit, base: build.Base | None = None) -> list[build.Setup]:
  """Every run's preflight and run-directory check, then the base loaded once and each run
  built on it and advised: steps 1-4 of a run for a group, writing nothing."""
  pres = []
  for cfg, name in zip(cfgs, names):
    with _naming(name):
      pres.append(build.preflight(cfg, objective.rules))
      log(f"{name}: data: {pres[-1].stats}")
      rundir.check(cfg, resume)
  emit(events.phase("load"))
  base = base or build.load_base(cfgs[0], pres[0], log, shared=True)
  setups = []
  for cfg, name, pre in zip(cfgs, names, pres):
    with _naming(name):
      s = build.build(cfg, pre, log, base, emit if not setups else events.ignore)
      group_lib.stackable(s, "train")
      _advise_setup(objective, s, pre, force, lambda text, name=name: log(f"{name}: {text}"))
      setups.append(s)
  return setups


def _train_group(setups: list[build.Setup], objective: Kind, resume: bool, progress: bool,
                 log, emit) -> list[dict | loop.NonFiniteLoss | None]:
  """The runs' directories created and locked, trained together, each finished run's
  adapters and summary written (however the group stopped): each run's outcome."""
  locks, members = [], []
  try:
    for s in setups:
      run_dir, lock = rundir.create(s.cfg, resume)
      locks.append(lock)
      members.append(plug.Member(s, run_dir, objective.group.batches(s)))
    try:
      loop.run_members(members, group_lib.Stacked(objective.group), resume=resume, log=log,
                       progress=progress, emit=emit)
    finally:  # the runs that finished keep their summary and adapters however it stopped
      emit(events.phase("finish"))
      outcomes = []
      for m in members:
        if m.error is not None:
          outcomes.append(m.error)
        elif m.state is not None:
          with checkpoint.storage_failures(m.run_dir):
            outcomes.append(_finish(m.s, m.run_dir, m.result()))
        else:
          outcomes.append(None)
    return outcomes
  finally:
    for lock in locks:
      lock.release()


def _finish(s: build.Setup, run_dir: str, result: plug.Result) -> dict:
  """adapters.safetensors and summary.json of a completed run."""
  t, trainable = s.cfg.train, result.state["trainable"]
  if t.method == "lora":
    rundir.save_adapters(fs.join(run_dir, "adapters.safetensors"), trainable["lora"],
                         s.spec)
  last, before, after = result.last, result.before, result.after
  step_dir = fs.join(run_dir, "checkpoints", str(t.steps))
  summary = {
      "steps": t.steps, "method": t.method, "lr": s.lr,
      "final_train_loss": last and last["loss"],
      "tokens_per_s": last and last["tokens_per_s"],
      "eval_loss_before": before.get("eval_loss"), "eval_loss_after": after.get("eval_loss"),
      "accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
      "accuracy_examples": s.cfg.eval.examples if "accuracy" in after else 0,
      "trainable_bytes": _tree_bytes(trainable),
      "optimizer_bytes": _tree_bytes(result.state["opt_state"]),
      "checkpoint_array_bytes": result.stored_bytes,  # the last checkpoint: no frozen base
      "checkpoint_bytes": checkpoint.size_bytes(step_dir) if fs.is_dir(step_dir) else None,
  }
  for key in sorted(set(before) | set(after)):  # an objective's own held-out metrics
    summary.setdefault(f"{key}_before", before.get(key))
    summary.setdefault(f"{key}_after", after.get(key))
  if multihost.primary():
    fs.write_json(fs.join(run_dir, "summary.json"), summary)
  return summary


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
             if hasattr(x, "dtype"))

