"""A trained run read back, and what it gives: ``jlora generate`` (base + adapters, no
merge), ``jlora export`` (a PEFT adapter, ``jlora.interop.peft``, or a llama.cpp one,
``jlora.interop.gguf_adapter``) and ``jlora merge`` (an
HF model directory, ``jlora.interop.merged``). Reading a run needs its config and a
checkpoint, never its training data or an objective's plug-ins (an RL reward).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import models
from jlora.core import lora as lora_lib, optim, stack
from jlora.infra import fs, mesh as mesh_lib
from jlora.interop import merged, peft
from jlora.models import hub
from jlora.data import render
from jlora.run import build, checkpoint, config as config_lib, evaluate, group


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
  cfg = _run_config(run_dir)
  steps = checkpoint.steps(run_dir)
  if not steps:
    raise ValueError(f"{run_dir}: no checkpoint yet")
  if step is not None and step not in steps:
    raise ValueError(f"{run_dir}: no checkpoint at step {step}; there are steps "
                     f"{', '.join(map(str, steps))}")
  s = build.build(cfg, build.reading(cfg), log=lambda _: None, base=base)
  trainable, step = checkpoint.restore_trainable(run_dir, s, step)
  return Trained(s, trainable, step)


def export_run(run_dir: str, out: str, step: int | None = None, base=None,
               moe_layout: str = "per-expert", format: str = "peft", dtype: str = "f32"
               ) -> str:
  """``jlora export RUN_DIR --format peft --out DIR [--moe-layout fused]`` (``base``: the
  model already loaded, as in ``load_trained``; ``moe_layout``: ``peft.MOE_LAYOUTS``), or
  ``--format gguf --out FILE.gguf [--dtype f16]``: a llama.cpp LoRA adapter
  (``gguf_adapter``)."""
  if format not in ("peft", "gguf"):
    raise ValueError(f"--format {format!r} is not peft or gguf")
  if format == "gguf" and os.path.exists(out):
    raise ValueError(f"--out {out} already exists")
  run = load_trained(run_dir, step, base)
  s, trainable = run.setup, run.trainable
  if s.cfg.train.method == "full":
    raise ValueError(f"{run_dir} is a full fine-tuning run: it has no adapters to export "
                     "(use `jlora merge`)")
  full = lora_lib.flatten(trainable["full"]) if trainable["full"] else None
  if format == "gguf":
    if full:
      raise ValueError(f"{run_dir} trains {', '.join(sorted(full))} in full: a llama.cpp "
                       "LoRA adapter holds LoRA factors only (use `jlora merge`)")
    from jlora.interop import gguf_adapter
    return gguf_adapter.save(out, trainable["lora"], s.spec, s.model_cfg, dtype)
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
  """``jlora generate RUN_DIR``: sample from a run's base + adapters (no merge)."""
  return generate_each([run_dir], prompt, max_new_tokens=max_new_tokens,
                       temperature=temperature, seed=seed, step=step, chat=chat)[0]


def generate_each(run_dirs: list[str], prompt: str, *, max_new_tokens: int = 64,
                  temperature: float = 0.0, seed: int = 0, step: int | None = None,
                  chat: bool = True) -> list[str]:
  """``jlora generate RUN_A RUN_B ...``: the prompt answered by each run. Several runs
  share one base (checked on their configs before anything loads: one line naming the run
  and the key that differs), loaded once; their adapters are stacked
  (``jlora.core.stack``) and every run's answer comes from one batch, a row per run
  (``models.sample(adapter_ids=...)``): what each run alone answers, token for token,
  sampled ones too (every row gets the key stream a run alone gets). ``step``: one
  checkpoint step for every run (default: each run's latest)."""
  cfgs = [_run_config(d) for d in run_dirs]
  if len(run_dirs) > 1:
    group.check(cfgs, run_dirs, keys=("model",), doing="generate")
  base = (build.load_base(cfgs[0], build.reading(cfgs[0]), log=lambda _: None, shared=True)
          if len(run_dirs) > 1 else None)
  runs = [load_trained(d, step, base) for d in run_dirs]
  s = runs[0].setup
  ids = render.prompt_ids({"prompt": prompt}, s.tok, chat=chat, system=s.cfg.data.system)
  if len(runs) == 1:
    params, adapter_ids = optim.model_params(runs[0].trainable, s.frozen, s.plan), None
  else:
    for d, run in zip(run_dirs, runs):
      try:
        group.stackable(run.setup, "generate")
      except ValueError as e:
        raise ValueError(f"{d}: {e}") from None
    st = stack.stack(s.frozen, [run.setup.plan for run in runs])
    params = stack.with_adapters(s.frozen, stack.stack_adapters(
        [run.trainable["lora"] for run in runs], st), st)
    adapter_ids = np.arange(len(runs))
  prompts = jnp.tile(jnp.asarray(ids, jnp.int32)[None], (len(runs), 1))
  # every row the key stream of a one-row batch's row: each run samples what it samples alone
  keys = jnp.tile(jax.random.fold_in(jax.random.PRNGKey(seed), 0)[None], (len(runs), 1))
  out = mesh_lib.traced_in(models.generate, s.mesh)(
      s.model, params, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
      rng=keys, adapter_ids=adapter_ids)
  return [s.tok.decode(evaluate.until_eos(row, s.tok.eos_id)) for row in np.asarray(out)]


def _run_config(run_dir: str) -> config_lib.RunConfig:
  path = fs.join(run_dir, "config.json")
  if not fs.is_file(path):
    raise ValueError(f"{run_dir}: not a run directory (no config.json)")
  return config_lib.load(path)
