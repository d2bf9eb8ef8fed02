"""jlora.objectives.rl.rewards: answers parsed leniently, the format bonus, reward modules
that do not load."""

import pytest


def test_answer_parsing_and_format():
  from jlora.objectives.rl import rewards
  cases = {"37 + 48 = 85": "85", "The answer is 1,024.": "1024", "#### -7": "-7",
           "so \\boxed{12} and then 5": "12", "3 apples, 4 pears: 7.0": "7",
           "Answer: 42, not 41": "42", "no digits": None, "85": "85"}
  for text, want in cases.items():
    assert rewards.final_answer(text) == want, text
  assert rewards.correct("It is 85.", "85") and not rewards.correct("It is 58.", "85")
  assert rewards.formatted(" 85. ") and rewards.formatted("the answer is 85")
  assert not rewards.formatted("85 is what 37 + 48 gives")
  assert rewards.score(rewards.answer_reward, "answer", "", "85", {"answer": "85"}, 0,
                       format_reward=0.1) == pytest.approx(1.1)
  with pytest.raises(ValueError, match="expected 'answer' or 'module:function'"):
    rewards.load("answers")
  with pytest.raises(ValueError, match="has no function 'nope'"):
    rewards.load("tests.rl_rewards:nope")
