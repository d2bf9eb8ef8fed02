"""The run loop every objective shares: resume, the step loop, logging, checkpoints,
held-out evaluation, the non-finite stop and preemption.

An objective (``jlora.objectives``: SFT, DPO, RL) supplies a ``plug.Objective``: its loss
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
import os
import signal
import threading
import time
from typing import Callable, Iterator

import jax

from jlora.core import optim
from jlora.infra import fs, multihost
from jlora.run import checkpoint, events, metrics as metrics_lib, plug, rundir, train_step


class NonFiniteLoss(RuntimeError):
  pass


class Interrupted(Exception):
  """A signal stopped the run; ``step`` is the checkpoint it left (None: none yet).
  ``others``: (step, run_dir) of the other runs of a group, saved at the same time."""

  def __init__(self, signum: int, step: int | None, run_dir: str,
               others: tuple[tuple[int | None, str], ...] = ()):
    self.signum, self.step, self.run_dir = signum, step, run_dir
    name = signal.Signals(signum).name
    saved = "; ".join(f"saved step {n} in {d}" if n is not None else f"no checkpoint yet in {d}"
                      for n, d in ((step, run_dir), *others))
    super().__init__(f"{name}: {saved}")

  @property
  def exit_code(self) -> int:
    return 130 if self.signum == signal.SIGINT else 0


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


def _fields(fields: tuple[str, ...]) -> tuple[str, ...]:
  return metrics_lib.Metrics.FIELDS + tuple(f for f in fields
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


def run(s, objective: plug.Objective, run_dir: str, *, resume: bool = False,
        log: Callable[[str], None] = print, progress: bool = True,
        emit: events.Listener = events.ignore) -> plug.Result:
  """Train ``s`` (a ``jlora.run.build.Setup``) with ``objective`` from step 0 or the latest
  checkpoint to ``train.steps``. ``emit`` is told the phases, each metrics row as it is
  written (a notebook's live plot) and each checkpoint (``jlora.run.events``). Raises
  ``NonFiniteLoss``, ``Interrupted`` (after saving) or ``checkpoint.StorageFailed``."""
  member = plug.Member(s, run_dir, objective.batches, objective.fields)
  run_members([member], plug.Alone(objective), resume=resume, log=log, progress=progress,
              emit=emit)
  return member.result()


@dataclasses.dataclass
class _Loop:
  """What the pieces of one step loop share."""
  members: list[plug.Member]  # every run of the step, in order
  trainer: plug.Trainer
  log: Callable[[str], None]
  emit: events.Listener
  progress: bool
  received: list[int] = dataclasses.field(default_factory=list)  # deferred_signals

  @property
  def group(self) -> bool:
    return len(self.members) > 1

  def say(self, m: plug.Member, text: str) -> None:
    self.log(f"{m.run_dir}: {text}" if self.group else text)

  def emit_row(self, m: plug.Member, row: dict) -> None:
    self.emit(events.row(row, m.run_dir if self.group else None))


def run_members(members: list[plug.Member], trainer: plug.Trainer, *, resume: bool = False,
                log: Callable[[str], None] = print, progress: bool = True,
                emit: events.Listener = events.ignore) -> None:
  """Train ``members`` together with ``trainer``, each from step 0 or its own latest
  checkpoint to its own ``train.steps``; each member's outcome is left in it
  (``Member.result``; ``Member.error``). A run that reaches its last step leaves the step
  and the others go on (the step rebuilt for them); in a group, a run that goes non-finite
  leaves it the same way, unsaved (``error``), while a run alone raises ``NonFiniteLoss``.
  A signal saves every run still training and raises ``Interrupted`` naming them all."""
  loop = _Loop(members, trainer, log, emit, progress)
  with contextlib.ExitStack() as guard:
    for m in members:  # a storage failure names the last good checkpoint of its run
      guard.enter_context(checkpoint.storage_failures(m.run_dir))
    _run(loop, resume)


def _run(loop: _Loop, resume: bool) -> None:
  members = loop.members
  try:
    states = []
    for m in members:
      m.ckpts = checkpoint.Checkpoints(checkpoint.directory(m.run_dir), keep=m.s.cfg.train.keep)
    at = _common_step(members) if resume else None
    for m in members:
      fresh = train_step.init_state(m.s.trainable, m.s.tx, m.s.mesh)
      m.s.trainable = None  # the state owns (and donates) them now
      m.template = checkpoint.abstract(fresh)
      states.append(_restore(loop, m, fresh, resume, at))
    step_fn, state = loop.trainer.build(members, states)
    del states, fresh
    _before(loop, state, [j for j, m in enumerate(members) if m.metrics_out is None])
    step_fn, state, active = _leave(loop, step_fn, state, list(members),
                                    [j for j, m in enumerate(members) if m.n >= m.steps])
    if active:
      with deferred_signals() as received:
        loop.received = received
        _steps(loop, step_fn, state, active)
    for m in members:
      m.ckpts.wait()
      latest = m.ckpts.latest_step()
      m.stored_bytes = None if latest is None else m.ckpts.stored_bytes(latest)
  finally:  # each closes even if another fails (a full disk fails the metrics' flush)
    with contextlib.ExitStack() as closing:
      for m in members:
        if m.ckpts is not None:
          closing.callback(m.ckpts.close)  # waits for saves in flight, whatever stopped it
        closing.callback(m.batches.close)
        if m.metrics_out is not None:
          closing.callback(m.metrics_out.close)
        if m.bar is not None:
          closing.callback(m.bar.close)


def _common_step(members: list[plug.Member]) -> int | None:
  """A group's step to resume from: the last checkpoint step every run has (None: one run
  alone, or runs without a common one: each resumes from its own latest). A group killed
  while saving leaves some runs a step ahead; resuming them all from the step they share
  repeats the steps they took together, so each run continues exactly as it would have
  (RL runs sample in one decode: a run continuing in other company would sample other
  floats)."""
  if len(members) < 2:
    return None
  steps = [set(m.ckpts.all_steps()) for m in members]
  common = set.intersection(*steps)
  return max(common) if common else None


def _restore(loop: _Loop, m: plug.Member, fresh, resume: bool, at: int | None = None):
  """A member's state: from its latest checkpoint, or step ``at`` (``_common_step``; later
  ones deleted), with its batch source's position and its held-out metrics before
  training; or ``fresh``."""
  latest = m.ckpts.latest_step()
  if resume and latest is not None:
    if at is not None and at < latest:
      m.ckpts.drop_after(at)
      loop.say(m, f"resuming at step {at}, the last step every run of the group saved "
                  f"(step {latest} dropped: the runs repeat the steps they took together)")
    state, data_state, meta = m.ckpts.restore(m.template, at)
    m.batches.set_state(checkpoint.own_positions(data_state))
    m.first = m.n = m.good = int(meta["step"])
    m.before = fs.read_json(fs.join(m.run_dir, "start.json"))
    m.metrics_out = metrics_lib.Metrics(m.run_dir, m.first, _fields(m.fields))
    loop.log(f"resumed {m.run_dir} at step {m.first}")
    return state
  if resume:
    loop.log(f"{m.run_dir} has no checkpoint yet: starting from step 0")
    if multihost.primary():
      rundir.clear_start(m.run_dir)  # what the start that saved nothing logged
  return fresh


def _before(loop: _Loop, state, fresh: list[int]) -> None:
  """Held-out metrics before training of the members starting from step 0 (one batched
  evaluation): start.json and metrics row 0."""
  if not fresh:
    return
  loop.emit(events.phase("evaluation"))
  loop.log("evaluating before training")
  begin = time.perf_counter()
  found = loop.trainer.evaluate(state["trainable"], fresh, True)
  took = time.perf_counter() - begin
  for j, before in zip(fresh, found):
    m = loop.members[j]
    m.before = before
    m.metrics_out = metrics_lib.Metrics(m.run_dir, None, _fields(m.fields))
    if multihost.primary():
      fs.write_json(fs.join(m.run_dir, "start.json"), before)
    m.metrics_out.write({"step": 0, **before})
    loop.emit_row(m, {"step": 0, **before})
    loop.say(m, "before training: " + (", ".join(f"{k} {v:.4g}" for k, v in before.items())
                                       or "no held-out data") + f" ({took:.1f} s)")


def _leave(loop: _Loop, step_fn, state, active: list[plug.Member], leaving: list[int]):
  """Members ``leaving`` (indices into ``active``: finished or diverged) leave the step;
  the step is rebuilt for the rest. Returns (step, state, the members still training)."""
  if not leaving:
    return step_fn, state, active
  owned = [loop.trainer.own(state, j) for j in range(len(active))]
  for j in leaving:
    m = active[j]
    if m.error is None:
      m.state = owned[j]
      if not m.after:  # resumed at its last step: nothing ran, nothing evaluated yet
        m.after = loop.trainer.evaluate(state["trainable"], [j], True)[0]
  keep = [j for j in range(len(active)) if j not in leaving]
  if not keep:
    return None, state, []
  rest = [active[j] for j in keep]
  step_fn, state = loop.trainer.build(rest, [owned[j] for j in keep])
  return step_fn, state, rest


def _steps(loop: _Loop, step_fn, state, active: list[plug.Member]) -> None:
  """The step loop proper, until every member has left it."""
  for j, m in enumerate(active):
    m.bar = _progress(m.steps, m.first, loop.progress,
                      os.path.basename(m.run_dir.rstrip("/")) if loop.group else None, j)
  timer = _Timer()
  begin, compiled_at, fresh_build = None, 0.0, True
  while active:
    for m in active:
      m.ckpts.poll()  # a checkpoint that failed in the background stops the run here
    fetch = time.perf_counter()
    batch = loop.trainer.next(state)
    timer.batch(time.perf_counter() - fetch)
    if fresh_build:
      compiled_at = time.perf_counter()
      step_fn = _compile(loop, step_fn, state, batch)
    state, metrics = step_fn(state, plug.frozen_of(loop.trainer.objective, active[0].s),
                             batch)
    if begin is None:  # throughput counts from here: the first step includes compilation
      jax.block_until_ready(metrics)
      begin = time.perf_counter()
    else:
      if fresh_build:  # the step rebuilt for the runs left: its compilation is not training
        begin += time.perf_counter() - compiled_at
      for j, m in enumerate(active):
        m.seen_tokens += loop.trainer.tokens(batch, j)
    fresh_build = False
    for m in active:
      m.n += 1
    final = [m.n == m.steps for m in active]
    logged = [f or not (m.n % m.s.cfg.train.log_every and m.n % m.s.cfg.train.checkpoint_every)
              for f, m in zip(final, active)]
    stop = _stop_here(loop.received, any(logged), all(final))
    if not any(logged) and not stop:
      continue  # no host sync: the next step is dispatched right away
    rows, leaving = _rows(loop, active, metrics, logged, stop, timer.take(), begin)
    _evaluate(loop, state, active, rows, final)
    saving = None
    for j, row in rows.items():
      m = active[j]
      if m.n % m.s.cfg.train.checkpoint_every == 0 or final[j] or stop:
        if saving is not None:  # a group's saves one at a time: one run's state copy held
          saving.ckpts.wait()
        _save(loop, m, loop.trainer.own(state, j), row)
        saving = m
      m.metrics_out.write(row)
      loop.emit_row(m, row)
      m.last = row
      _show(m.bar, m.n, row)
    if stop:
      # run_members waits for the saves to commit; a process without a signal of its own
      # stops as for SIGTERM (another process's)
      saved = [(m.n, m.run_dir) for j, m in enumerate(active) if j in rows]
      raise Interrupted(loop.received[0] if loop.received else signal.SIGTERM, *saved[0],
                        others=tuple(saved[1:]))
    leaving += [j for j in rows if final[j]]
    if leaving:
      for j in leaving:
        active[j].bar.close()
      step_fn, state, active = _leave(loop, step_fn, state, active, sorted(leaving))
      fresh_build = True


def _progress(total: int, initial: int, enabled: bool, name: str | None = None,
              position: int = 0):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc=name,
              position=position, dynamic_ncols=True)


def _rows(loop: _Loop, active: list[plug.Member], metrics, logged: list[bool], stop: bool,
          timing: dict, begin: float) -> tuple[dict[int, dict], list[int]]:
  """The metrics rows of the members that log at this step ({index: row}), and those
  whose loss, gradient or parameters went non-finite (a run alone raises)."""
  host = multihost.to_host(metrics)
  elapsed = time.perf_counter() - begin
  rows, diverged = {}, []
  for j, m in enumerate(active):
    if not (logged[j] or stop):
      continue
    picked = loop.trainer.pick(host, j)
    try:
      _check_finite(picked, m.n, m.good, m.ckpts)
    except NonFiniteLoss as e:
      if not loop.group:
        raise
      m.error = e  # it leaves the group; its last good checkpoint stays
      loop.say(m, f"stopped: {e}")
      diverged.append(j)
      continue
    m.good = m.n
    row = _row(m.n, picked, optim.lr_at(m.s.lr_schedule, m.n - 1), m.seen_tokens, elapsed)
    row.update(timing, **m.batches.metrics())
    rows[j] = row
  return rows, diverged


def _compile(loop: _Loop, step_fn, state, batch):
  """The step compiled for the batch's shapes, ahead of its first call."""
  loop.emit(events.phase("compilation"))
  begin = time.perf_counter()
  frozen = plug.frozen_of(loop.trainer.objective, loop.members[0].s)
  compiled = train_step.compile_step(step_fn, state, frozen, batch)
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


def _evaluate(loop: _Loop, state, active: list[plug.Member], rows: dict[int, dict],
              final: list[bool]) -> None:
  """Held-out metrics into the rows, batched over the members that need them: all of them
  after a member's final step (kept as its ``after``), the cheaper ``eval_loss`` every
  ``eval.every`` steps."""
  full = [j for j in rows if final[j]]
  cheap = [j for j in rows if not final[j] and active[j].s.cfg.eval.every
           and active[j].n % active[j].s.cfg.eval.every == 0]
  if full:
    loop.emit(events.phase("final evaluation"))
    loop.log("evaluating after training")
    for j, found in zip(full, loop.trainer.evaluate(state["trainable"], full, True)):
      rows[j].update(found)
      active[j].after = found
  if cheap:
    for j, found in zip(cheap, loop.trainer.evaluate(state["trainable"], cheap, False)):
      rows[j].update(found)


def _save(loop: _Loop, m: plug.Member, state, row: dict) -> None:
  """Checkpoint step ``m.n`` of a member: its state, every process's batch-source
  position, meta."""
  loop.emit(events.checkpoint(m.n, m.run_dir if loop.group else None))
  m.ckpts.save(m.n, state, checkpoint.positions(m.batches.get_state()),
               {"step": m.n, "seed": m.s.cfg.train.seed, "loss": row["loss"]},
               eval_loss=row.get("eval_loss"))


def _show(bar, n: int, row: dict) -> None:
  extra = {"reward": f"{row['reward_mean']:.3f}"} if "reward_mean" in row else {}
  bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s'] or 0:.0f}", **extra)
  bar.update(n - bar.n)
