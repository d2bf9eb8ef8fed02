"""The run loop every objective shares: resume, the step loop, logging, checkpoints,
held-out evaluation, the non-finite stop and preemption.

An objective (``jlora.objectives``: SFT, RL) supplies an ``Objective``: its loss
(``train_step.build`` turns it into the one train step, jitted with the state's
shardings), a batch source, and its held-out evaluation. Everything else is here, once,
with these guarantees (the order of the loop's work within a run: docs/ARCHITECTURE.md,
"A run, and where an objective plugs in"):

- resume: the trainable state, optimizer state and the batch source's position come
  back from the latest checkpoint (``checkpoint.Checkpoints``), bit-exact on CPU;
- the loop dispatches step n+1 before it reads step n's metrics, and syncs with the host
  only on steps it logs or checkpoints;
- SIGTERM (what a scheduler or a TPU VM sends before preempting) and SIGINT (Ctrl-C) are
  deferred while it runs: the step in flight finishes, a checkpoint is written at it, and
  ``Interrupted`` says which step was saved (the CLI exits 0 for SIGTERM, 130 for SIGINT);
  with several processes, all stop at the first logged step where any has a signal;
- a non-finite loss, gradient or parameter stops the run before it is checkpointed
  (``NonFiniteLoss``), so the last checkpoint is always a usable one;
- a write that fails (a full disk: a checkpoint, metrics) stops the run at the next step
  (checkpoints are polled every step, without blocking) with
  ``checkpoint.StorageFailed``, one line naming the cause and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import jax

from jlora.core import optim
from jlora.infra import fs, mesh as mesh_lib, multihost
from jlora.run import checkpoint, events, metrics as metrics_lib, rundir, train_step


class NonFiniteLoss(RuntimeError):
  pass


class Interrupted(Exception):
  """A signal stopped the run; ``step`` is the checkpoint it left (None: none yet)."""

  def __init__(self, signum: int, step: int | None, run_dir: str):
    self.signum, self.step, self.run_dir = signum, step, run_dir
    name = signal.Signals(signum).name
    saved = f"saved step {step} in {run_dir}" if step is not None else \
        f"no checkpoint yet in {run_dir}"
    super().__init__(f"{name}: {saved}")

  @property
  def exit_code(self) -> int:
    return 130 if self.signum == signal.SIGINT else 0


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
    return mesh_lib.global_batch(next(self._it), self._mesh)

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
    evaluate: trainable -> held-out metrics, run before and after training.
    eval_loss: trainable -> the cheaper metrics run every ``eval.every`` steps.
    fields: extra metric names for metrics.csv (JSONL and TensorBoard take them all).
  """
  loss: train_step.LossFn
  batches: Batches
  evaluate: Callable[[Any], dict]
  eval_loss: Callable[[Any], dict]
  fields: tuple[str, ...] = ()


@dataclasses.dataclass
class Result:
  state: Any
  first: int  # the step this invocation started from
  before: dict  # held-out metrics before training
  after: dict  # and after
  last: dict | None  # the last logged row
  stored_bytes: int | None  # arrays in the last checkpoint


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[int]]:
  """Within the block SIGINT and SIGTERM are recorded (in the yielded list) instead of
  interrupting; the loop polls the list between steps. Outside the main thread (where
  Python cannot install handlers) nothing is deferred."""
  received: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  sigs = (signal.SIGINT, signal.SIGTERM)
  old = {sig: signal.signal(sig, lambda signum, _: received.append(signum)) for sig in sigs}
  try:
    yield received
  finally:
    for sig, handler in old.items():
      signal.signal(sig, handler)


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
              dynamic_ncols=True)


def _start(s, objective: Objective, ckpts, state, run_dir: str, resume: bool, log, emit):
  """(state, first step, held-out metrics before training, Metrics) for a fresh or
  resumed run."""
  start_file = fs.join(run_dir, "start.json")
  if resume and ckpts.latest_step() is not None:
    state, data_state, meta = ckpts.restore(checkpoint.abstract(state))
    objective.batches.set_state(checkpoint.own_positions(data_state))
    first = int(meta["step"])
    before = fs.read_json(start_file)
    log(f"resumed {run_dir} at step {first}")
    return state, first, before, metrics_lib.Metrics(run_dir, first, _fields(objective))
  if resume:
    log(f"{run_dir} has no checkpoint yet: starting from step 0")
    if multihost.primary():
      rundir.clear_start(run_dir)  # what the start that saved nothing logged
  metrics = metrics_lib.Metrics(run_dir, None, _fields(objective))
  emit(events.phase("evaluation"))
  log("evaluating before training")
  begin = time.perf_counter()
  before = objective.evaluate(state["trainable"])
  if multihost.primary():
    fs.write_json(start_file, before)
  metrics.write({"step": 0, **before})
  emit(events.row({"step": 0, **before}))
  log("before training: " + (", ".join(f"{k} {v:.4g}" for k, v in before.items()) or
                             "no held-out data") + f" ({time.perf_counter() - begin:.1f} s)")
  return state, 0, before, metrics


def _fields(objective: Objective) -> tuple[str, ...]:
  return metrics_lib.Metrics.FIELDS + tuple(f for f in objective.fields
                                            if f not in metrics_lib.Metrics.FIELDS)


def _row(n: int, m: dict, lr: float, seen_tokens: int, elapsed: float) -> dict:
  extra = {k: float(v) for k, v in m.items()
           if k not in ("loss", "grad_norm", "tokens", "finite")}
  return {"step": n, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": lr,
          "tokens": int(m["tokens"]),
          "tokens_per_s": seen_tokens / elapsed if seen_tokens else None,
          "elapsed_s": elapsed, **extra}


class _Timer:
  """Wall seconds per step, and those spent getting batches (data loading; sampling for
  RL), averaged over the steps since the last logged row."""

  def __init__(self):
    self.mark, self.steps, self.data = time.perf_counter(), 0, 0.0

  def batch(self, seconds: float) -> None:
    self.steps, self.data = self.steps + 1, self.data + seconds

  def take(self) -> dict:
    now = time.perf_counter()
    out = {"step_s": (now - self.mark) / max(self.steps, 1),
           "data_s": self.data / max(self.steps, 1)}
    self.mark, self.steps, self.data = now, 0, 0.0
    return out


def run(s, objective: Objective, run_dir: str, *, resume: bool = False,
        log: Callable[[str], None] = print, progress: bool = True,
        emit: events.Listener = events.ignore) -> Result:
  """Train ``s`` (a ``jlora.run.build.Setup``) with ``objective`` from step 0 or the latest
  checkpoint to ``train.steps``. ``emit`` is told the phases, each metrics row as it is
  written (a notebook's live plot) and each checkpoint (``jlora.run.events``). Raises
  ``NonFiniteLoss``, ``Interrupted`` (after saving) or ``checkpoint.StorageFailed``."""
  with checkpoint.storage_failures(run_dir):
    return _run(s, objective, run_dir, resume, log, progress, emit)


@dataclasses.dataclass
class _Loop:
  """What the pieces of one run's step loop share."""
  s: Any  # the build.Setup
  objective: Objective
  ckpts: checkpoint.Checkpoints
  metrics_out: metrics_lib.Metrics
  run_dir: str
  log: Callable[[str], None]
  emit: events.Listener
  received: list[int]  # signals received (deferred_signals)


def _run(s, objective, run_dir, resume, log, progress, emit) -> Result:
  t = s.cfg.train
  ckpts = checkpoint.Checkpoints(checkpoint.directory(run_dir), keep=t.keep)
  step_fn, state = train_step.build(objective.loss, s.tx, s.trainable, s.frozen, s.mesh,
                                    t.grad_accum)
  s.trainable = None  # the state owns (and donates) them now
  metrics_out = None
  try:
    state, first, before, metrics_out = _start(s, objective, ckpts, state, run_dir, resume,
                                               log, emit)
    with deferred_signals() as received:
      loop = _Loop(s, objective, ckpts, metrics_out, run_dir, log, emit, received)
      state, last, after = _steps(loop, step_fn, state, first, progress)
    ckpts.wait()
    latest = ckpts.latest_step()
    stored = None if latest is None else ckpts.stored_bytes(latest)
  finally:  # each closes even if another fails (a full disk fails the metrics' flush)
    with contextlib.ExitStack() as closing:
      closing.callback(ckpts.close)  # waits for saves in flight, whatever stopped the loop
      closing.callback(objective.batches.close)
      if metrics_out is not None:
        closing.callback(metrics_out.close)
  if not after:
    after = objective.evaluate(state["trainable"])
  return Result(state, first, before, after, last, stored)


def _steps(loop: _Loop, step_fn, state, first: int, progress: bool):
  """The step loop proper: (state, last logged row, held-out metrics after the final
  step or {})."""
  s, objective, ckpts = loop.s, loop.objective, loop.ckpts
  t = s.cfg.train
  bar = _progress(t.steps, first, progress)
  begin, seen_tokens, last, after, good = time.perf_counter(), 0, None, {}, first
  timer = _Timer()
  try:
    for step in range(first, t.steps):
      ckpts.poll()  # a checkpoint that failed in the background stops the run here
      fetch = time.perf_counter()
      batch = objective.batches.next(state)
      timer.batch(time.perf_counter() - fetch)
      if step == first:
        step_fn = _compile(loop, step_fn, state, batch)
      state, metrics = step_fn(state, s.frozen, batch)
      n = step + 1
      if step == first:  # throughput counts from here: the first step includes compilation
        jax.block_until_ready(metrics)
        begin = time.perf_counter()
      else:
        seen_tokens += batch["inputs"].size if "inputs" in batch else 0
      final = n == t.steps
      logged = final or not (n % t.log_every and n % t.checkpoint_every)
      stop = _stop_here(loop.received, logged, final)
      if not logged and not stop:
        continue  # no host sync: the next step is dispatched right away
      m = multihost.to_host(metrics)
      _check_finite(m, n, good, ckpts)
      good = n
      row = _row(n, m, optim.lr_at(s.lr_schedule, step), seen_tokens,
                 time.perf_counter() - begin)
      row.update(timer.take(), **objective.batches.metrics())
      after = _evaluate(loop, state, n, final, row) or after
      if n % t.checkpoint_every == 0 or final or stop:
        _save(loop, n, state, row)
      loop.metrics_out.write(row)
      loop.emit(events.row(row))
      last = row
      _show(bar, n, row)
      if stop:
        # run() waits for the save to commit; a process without a signal of its own stops
        # as for SIGTERM (another process's)
        raise Interrupted(loop.received[0] if loop.received else signal.SIGTERM, n,
                          loop.run_dir)
  finally:
    bar.close()
  return state, last, after


def _compile(loop: _Loop, step_fn, state, batch):
  """The step compiled for the first batch's shapes, ahead of its first call."""
  loop.emit(events.phase("compilation"))
  begin = time.perf_counter()
  compiled = train_step.compile_step(step_fn, state, loop.s.frozen, batch)
  loop.log(f"compiled the train step in {time.perf_counter() - begin:.1f} s")
  loop.emit(events.phase("steps"))
  return compiled


def _stop_here(received: list[int], logged: bool, final: bool) -> bool:
  """Whether a signal stops the run at this step. With several processes all stop at the
  same step, the next logged one after any received a signal (one agreed collective)."""
  if final:
    return False
  if multihost.processes() == 1:
    return bool(received)
  return logged and multihost.any_process(bool(received))


def _check_finite(m: dict, n: int, good: int, ckpts) -> None:
  """``NonFiniteLoss`` before a non-finite state can be checkpointed."""
  if math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["finite"]:
    return
  kept = ckpts.latest_step()
  raise NonFiniteLoss(
      f"loss, gradient or parameters became non-finite at step {n} (last finite logged "
      f"step {good}); last good checkpoint: {'none' if kept is None else f'step {kept}'} "
      f"in {ckpts.directory}")


def _evaluate(loop: _Loop, state, n: int, final: bool, row: dict) -> dict:
  """Held-out metrics into ``row``: all of them after the final step (returned), the
  cheaper ``eval_loss`` every ``eval.every`` steps ({} returned)."""
  every = loop.s.cfg.eval.every
  if final:
    loop.emit(events.phase("final evaluation"))
    loop.log("evaluating after training")
    after = loop.objective.evaluate(state["trainable"])
    row.update(after)
    return after
  if every and n % every == 0:
    row.update(loop.objective.eval_loss(state["trainable"]))
  return {}


def _save(loop: _Loop, n: int, state, row: dict) -> None:
  """Checkpoint step ``n``: the state, every process's batch-source position, meta."""
  loop.emit(events.checkpoint(n))
  loop.ckpts.save(n, state, checkpoint.positions(loop.objective.batches.get_state()),
                  {"step": n, "seed": loop.s.cfg.train.seed, "loss": row["loss"]},
                  eval_loss=row.get("eval_loss"))


def _show(bar, n: int, row: dict) -> None:
  extra = {"reward": f"{row['reward_mean']:.3f}"} if "reward_mean" in row else {}
  bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s'] or 0:.0f}", **extra)
  bar.update(n - bar.n)
