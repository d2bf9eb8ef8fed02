"""``jlora study NAME``: reproduce a finding of "LoRA Without Regret" on a real model, with
plots and a verdict.

A study is a short declaration (``Study``): the finding's claim, the post's figure, a
``prepare`` that turns the budget into a base run config and a grid of arms (run-config
overrides), and an ``analyse`` that reduces the arms' results to a table, plots and a
verdict by a rule stated in the report. The arms run through the shared run loop
(``jlora.study.runner``) over one loaded base model and see the same batches in the same
order and the same held-out set; a study that is killed continues where it stopped.

    jlora study rank --budget small --out studies/rank

Budgets: ``smoke`` (a tiny random model, seconds: CI), ``small`` (SmolLM2-135M-Instruct,
sized for a 2-core CPU; wall times: bench/RESULTS.md, "Findings studies"), ``full`` (the
post's scale, for GPUs and TPUs).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Sequence

from jlora import models
from jlora.infra import fs
from jlora.run import config as config_lib, parsing, rundir
from jlora.study import report
from jlora.study.registry import BUDGETS, STUDIES, Context, StudyPlan

STUDY_FILE = "study.json"  # what makes a directory a study's: name, budget, invocations


def _load_all() -> None:
  """Import every study module (each registers itself in ``registry.STUDIES``)."""
  from jlora.study import (batch_study, capacity, compute, layers_study,  # noqa: F401
                           lr_study, rank_study, rl_study)


def check_overrides(overrides: Sequence[str]) -> None:
  """``--set`` keys and values must make a valid run config (checked before any file)."""
  values = parsing.apply_overrides({"run_dir": ".", "data": {"source": "task:arithmetic"}},
                                   list(overrides))
  config_lib.from_dict(values)


def _check_out(out: str, name: str, budget: str) -> None:
  """``--out`` must be new, empty, or this study's directory (continued), and not in use."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out}: exists and is not a directory")
  if not os.path.isdir(out):
    return
  if holder := rundir.Lock.holder(out):
    raise ValueError(f"{out} is in use by {holder}")
  path = os.path.join(out, STUDY_FILE)
  if not os.path.isfile(path):
    if any(f != rundir.LOCK_FILE for f in os.listdir(out)):
      raise ValueError(f"--out {out}: a directory that holds no study (no {STUDY_FILE}): "
                       "choose a new or empty directory")
    return
  try:
    saved = fs.read_json(path)
  except ValueError as e:
    raise ValueError(f"{path}: not a readable study record ({e})") from None
  if (saved.get("study"), saved.get("budget")) != (name, budget):
    raise ValueError(f"{out} holds study {saved.get('study')} at budget "
                     f"{saved.get('budget')}: choose another --out")


def _take_out(out: str, name: str, budget: str, prepare: Callable[[], StudyPlan | None]):
  """Lock ``out``, mark it as this study's (``study.json``) and run ``prepare`` (which may
  write model assets there): ``(lock, plan)``. If ``prepare`` fails in a directory this
  call created, the directory is removed: a mistake leaves nothing behind."""
  created = not os.path.exists(out)
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out {out}: cannot create the directory ({e.strerror})") from None
  lock = rundir.Lock(out)
  try:
    with fs.writing(f"study {out}"):
      if not os.path.isfile(os.path.join(out, STUDY_FILE)):
        fs.write_json(os.path.join(out, STUDY_FILE),
                          {"study": name, "budget": budget, "invocations": []})
      return lock, prepare()
  except BaseException:
    lock.release()
    if created:
      shutil.rmtree(out, ignore_errors=True)
    raise


def run(name: str, *, budget: str = "small", out: str | None = None, model: str | None = None,
        overrides: Sequence[str] = (), log: Callable[[str], None] = print,
        argv: Sequence[str] | None = None, seeds: int = 1) -> dict:
  """Run study ``name`` (resuming what ``out`` holds); returns {"verdict", "report", ...}.
  ``seeds``: every training arm at this many seeds (``runner.seeded``: seed k moves
  ``train.seed`` and the data's order by k; seed 0 is the arm itself, so a rerun with more
  seeds reuses the arms it finished); the table, plots and verdict read every seed (mean
  +- standard error, differences seed by seed: ``verdicts``). Raises ValueError, before writing anything, for an unknown study or
  budget, a bad ``--set`` or ``--seeds``, a model that does not exist, or an output
  directory in use."""
  _load_all()
  if name not in STUDIES:
    raise ValueError(f"unknown study {name!r}; known: {', '.join(STUDIES)}")
  if budget not in BUDGETS:
    raise ValueError(f"unknown budget {budget!r}; one of {', '.join(BUDGETS)}")
  if model is not None and not os.path.exists(models.resolve(model)):  # alias, Hub id
    raise ValueError(f"--model {model}: no such file or directory")
  check_overrides(overrides)
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")
  if argv is None:  # called from Python (a notebook): the command line that does the same
    argv = ["jlora", "study", name, "--budget", budget] + (["--out", out] if out else []) + \
        (["--model", model] if model else []) + [a for o in overrides for a in ("--set", o)] + \
        (["--seeds", str(seeds)] if seeds > 1 else [])
  out = os.path.abspath(out or os.path.join("studies", f"{name}-{budget}"))
  _check_out(out, name, budget)
  study = STUDIES[name]
  ctx = Context(name, budget, out, model, tuple(overrides), log, seeds)
  lock, plan = _take_out(out, name, budget, lambda: study.prepare(ctx))
  try:
    # a full disk (arms, results, plots, report) is one line; files are written whole
    with fs.writing(f"study {out}"):
      record = report.record_start(out, name, budget, report.command(argv))
      start = time.perf_counter()
      try:
        results = ctx.train(plan) if plan is not None else []
        outcome = study.analyse(ctx, plan, results)
      except BaseException:  # killed by a signal, an error: the time spent is still recorded
        report.record_end(out, record, time.perf_counter() - start)
        raise
      record = report.record_end(out, record, time.perf_counter() - start,
                                 verdict=outcome.verdict.outcome, headline=outcome.headline)
      path = report.write(out, title=study.title, claim=study.claim, figure=study.figure,
                          rule=study.rule, verdict=outcome.verdict, measured=outcome.measured,
                          table=outcome.table, plots=outcome.plots, record=record,
                          notes=outcome.notes, seeds=0 if plan is None else seeds)
  finally:
    lock.release()
  log(outcome.verdict.line().replace("**", ""))
  log(f"report: {path}")
  return {"verdict": outcome.verdict.outcome, "reason": outcome.verdict.reason,
          "report": path, "headline": outcome.headline, "wall_s": record["wall_s"]}


ALL = ("layers", "lr", "rank", "batch", "capacity", "rl", "compute")  # `jlora study all`
INDEX = "index.md"


def run_all(*, budget: str = "small", out: str | None = None, model: str | None = None,
            overrides: Sequence[str] = (), log: Callable[[str], None] = print,
            argv: Sequence[str] | None = None, seeds: int = 1) -> dict:
  """``jlora study all``: every study in ``ALL`` order into ``out/NAME`` (each resumes what
  it holds, so a killed run continues), then ``out/index.md``: one table of finding, the
  post's figure, jlora's measurement (mean +- s.e.) and verdict. ``compute`` counts FLOPs:
  one seed whatever ``seeds``. Everything a study checks before writing is checked for
  all of them first (one line, nothing written)."""
  _load_all()
  if budget not in BUDGETS:
    raise ValueError(f"unknown budget {budget!r}; one of {', '.join(BUDGETS)}")
  if model is not None and not os.path.exists(models.resolve(model)):
    raise ValueError(f"--model {model}: no such file or directory")
  check_overrides(overrides)
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")
  given = out or os.path.join("studies", f"all-{budget}")  # as the user wrote it
  out = os.path.abspath(given)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out}: exists and is not a directory")
  for name in ALL:
    _check_out(os.path.join(out, name), name, budget)
  argv = list(argv or ["jlora", "study", "all", "--budget", budget])
  results = {}
  for name in ALL:
    log(f"== study {name} ({ALL.index(name) + 1}/{len(ALL)})")
    n = 1 if name == "compute" else seeds
    sub = (["jlora", "study", name, "--budget", budget, "--out", os.path.join(given, name)] +
           (["--model", model] if model else []) +
           [a for o in overrides for a in ("--set", o)] + (["--seeds", str(n)] if n > 1 else []))
    results[name] = run(name, budget=budget, out=os.path.join(out, name), model=model,
                        overrides=overrides, log=log, argv=sub, seeds=n)
  path = report.write_index(out, [(STUDIES[n], results[n]) for n in ALL], budget, seeds,
                            report.command(argv))
  log(f"index: {path}")
  return {"index": path, "studies": results}
