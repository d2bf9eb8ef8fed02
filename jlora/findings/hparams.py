"""Hyper-parameters from the findings: the LoRA learning-rate rule and LoRA parameter
counts computed from a model config alone (FINDINGS 2, 8; "LoRA Without Regret").

The LR fit: FullFT LR = 5e-5 * (2000 / hidden_size) ** P, with P = 0.781 for Llama and
0.0775 for Qwen; the optimal LoRA LR is ~10x that (M_LoRA = 9.8 x M_FullFT), ~15x for
short runs (< ~100 steps: B starts at zero, an implicit warm-up).
"""

from __future__ import annotations

from jlora.models.config import ModelConfig

FULL_FT_BASE_LR = 5e-5
POWER = {"llama": 0.781, "qwen3": 0.0775}
LORA_MULTIPLIER, SHORT_RUN_MULTIPLIER, SHORT_RUN_STEPS = 10.0, 15.0, 100
# RL (`jlora rl`) with no train.lr: this fraction of the rule, for LoRA and FullFT alike
# (their 10x ratio kept). The fit above is SFT's; why a tenth: bench/RESULTS.md, "RL with
# LoRA".
RL_LR_FACTOR = 0.1
# Preference tuning (`jlora dpo`) with no train.lr: likewise a tenth. At the rule's 1.98e-3
# DPO on SmolLM2 drove held-out greedy accuracy from 48% to 5% in 30 steps; at a tenth it
# learned the preferences (held-out 88%) and kept its answers: bench/RESULTS.md, "DPO".
PREFERENCE_LR_FACTOR = 0.1


def full_ft_lr(cfg: ModelConfig) -> float:
  """The published FullFT LR fit for the model's family."""
  if cfg.family not in POWER:
    raise ValueError(f"no learning-rate fit exists for the {cfg.model_type!r} family; use "
                     "lora_lr_from_full_ft with your own FullFT learning rate")
  return FULL_FT_BASE_LR * (2000.0 / cfg.hidden_size) ** POWER[cfg.family]


def lora_lr_from_full_ft(full_lr: float, steps: int | None = None) -> float:
  """The LoRA LR for a given FullFT LR: 10x, or 15x for runs under ~100 steps."""
  if full_lr <= 0:
    raise ValueError(f"FullFT learning rate must be > 0, got {full_lr}")
  short = steps is not None and steps < SHORT_RUN_STEPS
  return full_lr * (SHORT_RUN_MULTIPLIER if short else LORA_MULTIPLIER)


def lora_lr(cfg: ModelConfig, steps: int | None = None) -> float:
  """The recommended LoRA LR for a Llama or Qwen model (FINDINGS 2)."""
  return lora_lr_from_full_ft(full_ft_lr(cfg), steps)


def lora_params(cfg: ModelConfig, rank: int, targets="all", **spec_kwargs) -> int:
  """LoRA parameters a spec would add to this model, from the config alone (an abstract
  init: no weights, no memory). MoE experts count one adapter per expert at
  rank // experts_per_token (FINDINGS 8)."""
  from jlora import models
  spec = models.lora_spec(cfg, rank, targets=targets, **spec_kwargs)
  return models.abstract_plan(cfg, spec).adapter_params
