"""``[rl]``: the RL objective's section of the run config, and what RL changes in the
run's defaults."""

from __future__ import annotations

import dataclasses
import math

from jlora.objectives.rl.losses import LOSSES
from jlora.run import config as config_lib

OVERLONG = ("none", "filter", "penalty")  # rl.overlong: DAPO's handling (rollouts.overlong)


@dataclasses.dataclass(frozen=True)
class RLSection:
  """``jlora rl``: policy-gradient RL on rewards (jlora.objectives.rl). Each step samples
  ``prompts_per_step`` prompts from ``data.source`` x ``group_size`` completions from the
  current policy (base + adapters), scores them, and takes one optimizer step on
  ``prompts_per_step * group_size`` rows (``data.batch_size`` is not used)."""
  group_size: int = 8  # completions per prompt; advantages are centred within a group
  prompts_per_step: int = 16
  max_new_tokens: int = 24
  temperature: float = 1.0
  top_p: float = 1.0
  # or ppo, grpo, dr_grpo, dapo, gspo, cispo (jlora.objectives.rl.losses: formulas, papers)
  loss: str = "importance_sampling"
  clip: float = 0.2  # ppo, grpo, dr_grpo: the ratio is clipped to [1 - clip, 1 + clip]
  clip_low: float = 0.2  # dapo: [1 - clip_low, 1 + clip_high] ("clip-higher")
  clip_high: float = 0.28  # dapo; cispo: the IS weight is capped at 1 + clip_high
  gspo_clip_low: float = 3e-4  # gspo: the sequence ratio's range (the paper's)
  gspo_clip_high: float = 4e-4
  kl_coef: float = 0.0  # KL penalty to the reference policy (the base, adapters off)
  track_kl: bool = True  # report the KL to the reference each step (one more forward)
  normalize_std: bool = False  # divide advantages by the group's reward std (GRPO)
  drop_constant_groups: bool = False  # groups whose rewards are all equal: no tokens
  reward: str = "answer"  # "answer" (the record's answer, parsed leniently) or module:function
  format_reward: float = 0.0  # added when the answer is stated explicitly
  bucket: int = 16  # prompts are left-padded to a multiple of this many tokens
  updates_per_batch: int = 1  # optimizer steps (epochs) on each sampled batch
  overlong: str = "none"  # or "filter" / "penalty": completions cut without EOS (DAPO)
  overlong_buffer: int = 4  # penalty: the last tokens of max_new_tokens that cost reward

  def __post_init__(self):
    for name in ("prompts_per_step", "max_new_tokens", "bucket", "updates_per_batch",
                 "overlong_buffer"):
      if getattr(self, name) < 1:
        raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
    if self.group_size < 2:
      raise ValueError(f"rl.group_size must be >= 2, got {self.group_size}: advantages "
                       "are rewards minus their group's mean, so a group of one has none "
                       "and the run cannot learn")
    if self.loss not in LOSSES:
      raise ValueError(f"rl.loss {self.loss!r} is not one of {', '.join(LOSSES)}")
    if self.overlong not in OVERLONG:
      raise ValueError(f"rl.overlong {self.overlong!r} is not one of {', '.join(OVERLONG)}")
    if self.overlong == "penalty" and self.overlong_buffer > self.max_new_tokens:
      raise ValueError(f"rl.overlong_buffer={self.overlong_buffer} exceeds "
                       f"rl.max_new_tokens={self.max_new_tokens}")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"rl.temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"rl.top_p must be in (0, 1], got {self.top_p}")
    for name in ("clip", "clip_low", "gspo_clip_low"):
      if not 0 < getattr(self, name) < 1:
        raise ValueError(f"rl.{name} must be in (0, 1), got {getattr(self, name)}")
    for name in ("clip_high", "gspo_clip_high"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
        raise ValueError(f"rl.{name} must be > 0, got {getattr(self, name)}")
    if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
      raise ValueError(f"rl.kl_coef must be >= 0, got {self.kl_coef}")
    if not math.isfinite(self.format_reward):
      raise ValueError(f"rl.format_reward must be finite, got {self.format_reward}")

  @property
  def rows(self) -> int:
    return self.group_size * self.prompts_per_step


# What ``jlora rl`` changes in the defaults (FINDINGS 6: an episode carries ~1 bit, so
# rank 1 has capacity to spare); a recipe's own values win.
SECTION = config_lib.Section("rl", RLSection, {"lora": {"rank": 1}})
