"""jlora.data.tasks: the built-in tasks are deterministic, checkable and held out; word
problems' answers are what their text implies."""

import numpy as np
import pytest

from jlora import data
from jlora.data import sources, tasks
from tests.helpers import byte_tokenizer


def test_tasks_are_deterministic_checkable_and_held_out():
  train = sources.open_source("task:arithmetic", seed=1)
  assert len(train) == 2000 and train[5] == sources.open_source("task:arithmetic", seed=1)[5]
  test = sources.open_source("task:arithmetic", split="test", seed=1)
  train_prompts = {train[i]["prompt"] for i in range(len(train))}
  assert not train_prompts & {test[i]["prompt"] for i in range(len(test))}
  for i in range(50):
    r = train[i]
    a, op, b = r["prompt"][8:-1].split(" ")
    assert int(r["answer"]) == {"plus": int(a) + int(b), "minus": int(a) - int(b),
                                "times": int(a) * int(b)}[op]
  task = tasks.get("arithmetic")
  assert task.check("12", "12") and task.check("It is 12.", "12") and not task.check("1 2", "12")
  assert tasks.get("reverse").check("tzqk", "tzqk")
  facts = sources.open_source("task:facts", size=300)
  keys = {facts[i]["prompt"] for i in range(300)}
  assert len(keys) == 300  # distinct keys: the answers carry exactly log2(100) bits each
  assert facts.info_bits == pytest.approx(300 * np.log2(100))
  s = data.stats(data.DataConfig(source="task:facts", size=300), byte_tokenizer())
  assert s.info_bits == pytest.approx(300 * np.log2(100)) and "exact" in s.info_basis


def test_word_problems_have_the_integer_answers_their_text_implies():
  import re

  from jlora.data import tasks
  train = tasks.source("word_problems", "train", size=300)
  test = tasks.source("word_problems", "test", size=60)
  assert not {train[i]["prompt"] for i in range(300)} & {test[i]["prompt"] for i in range(60)}
  for i in range(60):
    r = test[i]
    n = [int(x) for x in re.findall(r"\d+", r["prompt"])]
    p = r["prompt"]
    want = (n[0] + n[1] * n[2] - n[3] if "apples" in p else n[2] - n[0] * n[1] if "change" in p
            else n[0] * n[1] + n[2] if "km" in p else n[0] * n[1] - n[2] if "chairs" in p
            else n[0] * n[1] + n[2] * n[3])
    assert r["answer"] == str(want) and want >= 0, p
