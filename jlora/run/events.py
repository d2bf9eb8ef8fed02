"""What a run is doing, as events: the phases it goes through, every metrics row, every
checkpoint. Benchmarks, notebooks and tests subscribe to them (``driver.run(on_event=)``,
``jlora train --events FILE``) instead of reading the log's text.

Phases, in order: ``load`` (weights and tokenizer), ``set-up`` (plan, adapters,
optimizer, the advisor), ``evaluation`` (held-out metrics before training),
``compilation`` (the train step, for the first batch's shapes), ``steps``,
``final evaluation``, ``finish`` (adapters and summary written). A resumed run has no
``evaluation``; one resumed at its last step has none between ``set-up`` and ``finish``,
and a ``--resume`` of a finished run none at all. Times are ``time.monotonic()``: one clock
for every process on a machine, so a parent sampling a child's memory can place its samples
in the child's phases.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

PHASES = ("load", "set-up", "evaluation", "compilation", "steps", "final evaluation",
          "finish")


@dataclasses.dataclass(frozen=True)
class Event:
  """``kind``: "phase" (``name`` starts now), "row" (``row`` was written to the metrics
  files) or "checkpoint" (a save of ``step`` started)."""
  kind: str
  name: str
  time: float
  step: int | None = None
  row: dict | None = None
  run: str | None = None  # the run directory, when several runs train together (a group)

  def to_json(self) -> str:
    return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None})


Listener = Callable[[Event], None]


def ignore(event: Event) -> None:
  del event


def phase(name: str) -> Event:
  assert name in PHASES, name
  return Event("phase", name, time.monotonic())


def row(values: dict, run: str | None = None) -> Event:
  return Event("row", "row", time.monotonic(), int(values["step"]), dict(values), run)


def checkpoint(step: int, run: str | None = None) -> Event:
  return Event("checkpoint", "checkpoint", time.monotonic(), step, run=run)


def rows_to(on_row: Callable[[dict], None]) -> Listener:
  """A listener that passes each metrics row to ``on_row`` (a notebook's live plot)."""
  return lambda event: on_row(dict(event.row)) if event.kind == "row" else None


def both(first: Listener, second: Listener) -> Listener:
  def listener(event: Event) -> None:
    first(event)
    second(event)
  return listener


class JsonLines:
  """A listener appending each event to ``path`` as one JSON line, flushed at once (what
  ``--events FILE`` writes; another process may be reading it)."""

  def __init__(self, path: str):
    try:
      self._file = open(path, "a")
    except OSError as e:
      raise ValueError(f"--events {path}: cannot write ({e.strerror})") from None

  def __call__(self, event: Event) -> None:
    self._file.write(event.to_json() + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read(path: str) -> list[Event]:
  """The events a ``JsonLines`` wrote."""
  with open(path) as f:
    return [Event(**json.loads(line)) for line in f if line.strip()]
