"""Reward functions for the RL tests (``rl.reward = "tests.rl_rewards:NAME"``)."""

import os


def digits(prompt, completion, record):
  """Fraction of the completion's characters that are digits: varies on a random model, so
  advantages are non-zero and the adapters move."""
  del prompt, record
  return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def flaky(prompt, completion, record):
  """``digits`` until the call count in $JLORA_TEST_REWARD_CALLS reaches its limit, then a
  raise (a user's reward function failing mid-run)."""
  path = os.environ["JLORA_TEST_REWARD_CALLS"]
  with open(path) as f:
    left = int(f.read())
  with open(path, "w") as f:
    f.write(str(left - 1))
  if left <= 0:
    raise KeyError("no such field: 'solution'")
  return digits(prompt, completion, record)


def nan(prompt, completion, record):
  return float("nan")
