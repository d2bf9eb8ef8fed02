"""Built-in generated tasks: no network, answers checkable, information content known.

Every task is a random-access source of ``{"prompt", "completion", "answer"}`` records;
record ``i`` is a pure function of ``(seed, split, i)``, so any worker can produce any
record and a run is reproducible. ``task:NAME`` in a data config opens one.

- ``arithmetic``: "What is 37 plus 48?" -> "85" (two-digit +, -, and one-digit x). The
  held-out split holds problems the train split never contains (split by a hash of the
  problem), so test accuracy measures the skill, not recall.
- ``reverse``: "Reverse the letters of kqzt." -> "tzqk" (a string transform, held out the
  same way).
- ``word_problems``: "A hall has 4 rows of 7 chairs. 5 chairs are taken. How many chairs
  are free?" -> "23": two- or three-step GSM8K-style problems from templates, integer
  answers (held out the same way); RL's second built-in task.
- ``arithmetic_pairs``: ``arithmetic``'s problems as preference pairs for ``jlora dpo``:
  ``chosen`` the right answer, ``rejected`` a near miss (off by 1, 2 or 10), ``answer``
  kept so greedy accuracy is checkable as for ``arithmetic`` (the same held-out split).
- ``facts``: "What is the code of Bazomi?" -> "57": made-up keys with uniformly random
  values. Nothing generalises; the answers carry exactly ``log2(values)`` bits each, which
  makes this the capacity task (FINDINGS 5): ``info_bits`` is exact, and the "test" split
  is the train set itself (memorisation is the skill).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Callable

import numpy as np

_SPLITS = {"train": 0, "test": 1, "validation": 1}
_SYLLABLES = ("ba", "ko", "mi", "zu", "te", "ra", "no", "fi",
              "lo", "ge", "su", "da", "pe", "vo", "hi", "ju")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  make: Callable[[np.random.Generator], tuple[str, str]]
  answer_bits: float  # entropy of one answer given nothing learned: log2(#answers)
  exact_info: bool  # True when answer_bits is the information a model must store
  held_out: bool = True  # test problems never appear in train
  default_size: int = 2000
  pairs: bool = False  # records are preference pairs: a near miss as "rejected"

  def check(self, reply: str, answer: str) -> bool:
    """Whether a model's reply answers correctly: the first word/number of the reply."""
    match = re.search(r"-?\d+" if re.fullmatch(r"-?\d+", answer) else r"[A-Za-z]+", reply)
    return bool(match) and match.group(0) == answer


def _arithmetic(rng):
  op = rng.integers(3)
  if op == 2:
    a, b = (int(v) for v in rng.integers(0, 10, 2))
    return f"What is {a} times {b}?", str(a * b)
  a, b = (int(v) for v in rng.integers(10, 100, 2))
  if op == 0:
    return f"What is {a} plus {b}?", str(a + b)
  return f"What is {a} minus {b}?", str(a - b)


def _reverse(rng):
  word = "".join(chr(ord("a") + int(c)) for c in rng.integers(0, 26, int(rng.integers(4, 7))))
  return f"Reverse the letters of {word}.", word[::-1]


_NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eva", "Ben")


def _word_problem(rng):
  """A two- or three-step word problem with an integer answer (GSM8K-style)."""
  name = _NAMES[int(rng.integers(len(_NAMES)))]
  a, b, c, d = (int(v) for v in rng.integers(2, 10, 4))
  kind = int(rng.integers(5))
  if kind == 0:
    start = int(rng.integers(5, 40))
    return (f"{name} has {start} apples. {name} buys {a} bags with {b} apples in each bag, "
            f"then gives away {c} apples. How many apples does {name} have now?",
            str(start + a * b - c))
  if kind == 1:
    paid = a * b + int(rng.integers(1, 30))
    return (f"Pencils cost {b} dollars each. {name} buys {a} pencils and pays with {paid} "
            f"dollars. How much change does {name} get?", str(paid - a * b))
  if kind == 2:
    extra = int(rng.integers(1, 50))
    return (f"A train travels {a * 10} km every hour for {b} hours, then {extra} km more. "
            f"How many km does it travel in total?", str(a * 10 * b + extra))
  if kind == 3:
    taken = int(rng.integers(1, a * b))
    return (f"A hall has {a} rows of {b} chairs. {taken} chairs are taken. How many chairs "
            f"are free?", str(a * b - taken))
  return (f"{name} reads {a} pages a day for {b} days and {c} pages on each of the next "
          f"{d} days. How many pages does {name} read in all?", str(a * b + c * d))


_FACT_VALUES = 100


def _fact_key(index: int) -> str:
  # Bijective base-16 over syllables (a distinct key per index), capitalised.
  out, n = [], index + 16 ** 2  # at least three syllables
  while n:
    out.append(_SYLLABLES[n % 16])
    n //= 16
  return "".join(out).capitalize()


TASKS = {
    "arithmetic": Task("arithmetic", _arithmetic, math.log2(199), exact_info=False),
    "reverse": Task("reverse", _reverse, 6 * math.log2(26), exact_info=False),
    "word_problems": Task("word_problems", _word_problem, math.log2(500), exact_info=False),
    "arithmetic_pairs": Task("arithmetic_pairs", _arithmetic, math.log2(199),
                             exact_info=False, pairs=True),
    "facts": Task("facts", None, math.log2(_FACT_VALUES), exact_info=True, held_out=False),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
  return TASKS[name]


class TaskSource:
  """``size`` records of a task for one split (random access, deterministic)."""

  def __init__(self, task: Task, split: str = "train", seed: int = 0, size: int | None = None):
    if split not in _SPLITS:
      raise ValueError(f"task {task.name}: unknown split {split!r}; use train or test")
    self.task, self.split, self.seed = task, split, seed
    self.size = int(size if size is not None else
                    task.default_size if split == "train" or not task.held_out else
                    max(task.default_size // 10, 1))
    if self.size < 1:
      raise ValueError(f"task {task.name}: size must be >= 1, got {self.size}")
    if task.name == "facts":
      # Keys are a seeded permutation of distinct indices, values uniform: one fixed table.
      self._keys = np.random.default_rng([seed, 7]).permutation(max(self.size, 4096))

  def __len__(self) -> int:
    return self.size

  @property
  def info_bits(self) -> float:
    """Bits in the answers: exact for ``facts``; for rule tasks an upper bound (what
    memorising every answer would take; learning the rule takes far less)."""
    return self.size * self.task.answer_bits

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < self.size:
      raise IndexError(i)
    if self.task.name == "facts":
      key = _fact_key(int(self._keys[i]))
      value = str(int(np.random.default_rng([self.seed, 8, i]).integers(_FACT_VALUES)))
      return {"prompt": f"What is the code of {key}?", "completion": value, "answer": value}
    want = _SPLITS[self.split]
    for attempt in range(1000):
      prompt, answer = self.task.make(np.random.default_rng([self.seed, want, i, attempt]))
      if not self.task.held_out or (zlib.crc32(prompt.encode()) % 10 == 0) == bool(want):
        record = {"prompt": prompt, "completion": answer, "answer": answer}
        return _near_miss(record, np.random.default_rng([self.seed, want, i, 9])) \
            if self.task.pairs else record
    raise RuntimeError(f"task {self.task.name}: no {self.split} problem for record {i}")


def _near_miss(record: dict, rng) -> dict:
  """A preference pair of a record with an integer answer: chosen the answer, rejected a
  near miss (off by 1, 2 or 10 either way)."""
  miss = int(record["answer"]) + int(rng.choice([-10, -2, -1, 1, 2, 10]))
  return {**record, "chosen": record["answer"], "rejected": str(miss)}


def source(name: str, split: str = "train", seed: int = 0, size: int | None = None):
  return TaskSource(get(name), split, seed, size)
