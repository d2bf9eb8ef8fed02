"""Rewards for RL: checkable answers, an optional format bonus, and user functions.

A reward is ``reward(prompt, completion, record) -> float``: ``prompt`` and ``completion``
are text, ``record`` the data record the prompt came from (built-in tasks have
``"answer"``). ``rl.reward = "answer"`` (the default) is 1 when the completion's final
answer (``final_answer``) equals the record's, else 0; ``"module:function"`` names a user
function (imported from ``sys.path``, the working directory first). ``rl.format_reward``
adds that much when the answer is stated explicitly (``formatted``).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from typing import Callable

RewardFn = Callable[[str, str, dict], float]
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
# Explicit statements of a final answer, most specific first.
_EXPLICIT = (rf"####\s*({_NUMBER})", rf"\\boxed\{{\s*({_NUMBER})\s*\}}",
             rf"answer\s*(?:is|:|=)\s*\$?\s*({_NUMBER})")


class RewardError(ValueError):
  """A reward function raised or returned a non-finite value (a user mistake: the run stops
  with one line, its last checkpoint untouched)."""


def _number(text: str) -> str:
  text = text.replace(",", "")
  if "." in text and re.fullmatch(r"-?\d+\.0*", text):
    text = text.split(".")[0]
  return text


def final_answer(completion: str) -> str | None:
  """The completion's final answer, parsed leniently: the last explicitly stated answer
  ("#### 42", "\\boxed{42}", "the answer is 42"), else the last number in the text;
  thousands separators and a trailing ".0" are dropped. None when there is no number."""
  for pattern in _EXPLICIT:
    found = re.findall(pattern, completion, flags=re.IGNORECASE)
    if found:
      return _number(found[-1])
  numbers = re.findall(_NUMBER, completion)
  return _number(numbers[-1].rstrip(",")) if numbers else None


def formatted(completion: str) -> bool:
  """Whether the answer is stated explicitly: an explicit form (see ``final_answer``) or a
  completion that is just the number."""
  text = completion.strip().rstrip(".")
  return bool(re.fullmatch(_NUMBER, text)) or any(
      re.search(p, completion, flags=re.IGNORECASE) for p in _EXPLICIT)


def correct(completion: str, answer: str) -> bool:
  got = final_answer(completion)
  return got is not None and got == _number(str(answer).strip())


def answer_reward(prompt: str, completion: str, record: dict) -> float:
  """1.0 when the final answer equals ``record["answer"]``, else 0.0."""
  del prompt
  return float(correct(completion, record["answer"]))


def load(name: str) -> RewardFn:
  """``"answer"`` or ``"module:function"``; a bad name is a one-line ValueError."""
  if name == "answer":
    return answer_reward
  module_name, sep, attr = name.partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"rl.reward {name!r}: expected 'answer' or 'module:function'")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"rl.reward {name!r}: cannot import {module_name!r} ({e})") from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ValueError(f"rl.reward {name!r}: {module_name} has no function {attr!r}")
  return fn


def score(fn: RewardFn, name: str, prompt: str, completion: str, record: dict, index: int,
          format_reward: float = 0.0) -> float:
  """``fn``'s reward (plus the format bonus), checked: a raise or a non-finite value is a
  ``RewardError`` naming the function and the record."""
  try:
    value = float(fn(prompt, completion, record))
  except Exception as e:  # any failure of user code: one line, the record named
    raise RewardError(f"reward {name} raised {type(e).__name__}: {e} (record {index}: "
                      f"{_short(record)})") from None
  if not math.isfinite(value):
    raise RewardError(f"reward {name} returned {value} (record {index}: {_short(record)})")
  return value + (format_reward if format_reward and formatted(completion) else 0.0)


def _short(record: dict, limit: int = 80) -> str:
  text = repr(record)
  return text if len(text) <= limit else text[:limit - 3] + "..."
