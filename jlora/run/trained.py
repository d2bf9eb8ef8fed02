"""A trained run read back, and what it gives: ``jlora generate`` (base + adapters, no
merge), ``jlora export`` (a PEFT adapter, ``jlora.interop.peft``) and ``jlora merge`` (an
HF model directory, ``jlora.interop.merged``). Reading a run needs its config and a
checkpoint, never its training data or an objective's plug-ins (an RL reward).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import models
from jlora.core import lora as lora_lib, optim
from jlora.infra import fs, mesh as mesh_lib
from jlora.interop import merged, peft
from jlora.models import hub
from jlora.data import render
from jlora.run import build, checkpoint, config as config_lib, evaluate


@dataclasses.dataclass
class Trained:
  """A trained run read back: its Setup, the trainable state of one checkpoint, the step."""
  setup: Any
  trainable: Any
  step: int

  @property
  def model_path(self) -> str:
    return config_lib.model_path(self.setup.cfg)


def load_trained(run_dir: str, step: int | None = None, base=None) -> Trained:
  """A finished or checkpointed run (``step``: default the latest), for generation and
  export. A step that is not on disk is a one-line error listing the ones that are.
  ``base``: the run's model already loaded (``build.load_base``), not read again."""
  path = fs.join(run_dir, "config.json")
  if not fs.is_file(path):
    raise ValueError(f"{run_dir}: not a run directory (no config.json)")
  steps = checkpoint.steps(run_dir)
  if not steps:
    raise ValueError(f"{run_dir}: no checkpoint yet")
  if step is not None and step not in steps:
    raise ValueError(f"{run_dir}: no checkpoint at step {step}; there are steps "
                     f"{', '.join(map(str, steps))}")
  cfg = config_lib.load(path)
  s = build.build(cfg, build.reading(cfg), log=lambda _: None, base=base)
  trainable, step = checkpoint.restore_trainable(run_dir, s, step)
  return Trained(s, trainable, step)


def export_run(run_dir: str, out: str, step: int | None = None, base=None,
               moe_layout: str = "per-expert") -> str:
  """``jlora export RUN_DIR --format peft --out DIR [--moe-layout fused]`` (``base``: the
  model already loaded, as in ``load_trained``; ``moe_layout``: ``peft.MOE_LAYOUTS``)."""
  run = load_trained(run_dir, step, base)
  s, trainable = run.setup, run.trainable
  if s.cfg.train.method == "full":
    raise ValueError(f"{run_dir} is a full fine-tuning run: it has no adapters to export "
                     "(use `jlora merge`)")
  full = lora_lib.flatten(trainable["full"]) if trainable["full"] else None
  name, revision = hub.base_name(s.cfg.model.path)  # a Hub id where jlora knows one
  return peft.save_peft(out, trainable["lora"], s.spec, s.model_cfg, full=full,
                        base_model=name, revision=revision, moe_layout=moe_layout)


def merge_run(run_dir: str, out: str, step: int | None = None,
              max_shard_size: str | int = "5GB", base=None, dtype: str | None = None) -> str:
  """``jlora merge RUN_DIR --out DIR [--dtype D]`` (``base`` as in ``export_run``; ``dtype``
  one of ``merged.NAMES``, default the base checkpoint's, ``merged.base_dtype``)."""
  if dtype is not None and dtype not in merged.NAMES:
    raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(merged.NAMES)}")
  run = load_trained(run_dir, step, base)
  s, trainable = run.setup, run.trainable
  params = optim.combine(trainable["full"], s.frozen)
  return merged.save_merged(out, params, trainable["lora"],
                            s.plan if trainable["lora"] else None, s.model_cfg,
                            run.model_path, s.tok, max_shard_size=max_shard_size,
                            dtype=merged.NAMES.get(dtype))


def generate(run_dir: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, step: int | None = None, chat: bool = True) -> str:
  """``jlora generate``: sample from a run's base + adapters (no merge)."""
  run = load_trained(run_dir, step)
  s = run.setup
  ids = render.prompt_ids({"prompt": prompt}, s.tok, chat=chat, system=s.cfg.data.system)
  params = optim.model_params(run.trainable, s.frozen, s.plan)
  out = mesh_lib.traced_in(models.generate, s.mesh)(
      s.model, params, jnp.asarray(ids)[None], max_new_tokens=max_new_tokens,
      temperature=temperature, rng=jax.random.PRNGKey(seed))
  return s.tok.decode(evaluate.until_eos(np.asarray(out[0]), s.tok.eos_id))
