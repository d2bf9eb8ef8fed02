"""``jlora export`` and ``jlora merge``: a trained run directory's adapters as a PEFT
adapter (``jlora.peft``) or merged into an HF model directory (``jlora.merged``)."""

from __future__ import annotations

import os

from jlora import lora as lora_lib, merged, optim, peft, rundir


def export_run(run_dir: str, out: str, step: int | None = None, base=None) -> str:
  """``jlora export RUN_DIR --format peft --out DIR`` (``base``: the model already
  loaded, as in ``rundir.load_trained``)."""
  run = rundir.load_trained(run_dir, step, base)
  s, trainable = run.setup, run.trainable
  if s.cfg.train.method == "full":
    raise ValueError(f"{run_dir} is a full fine-tuning run: it has no adapters to export "
                     "(use `jlora merge`)")
  full = lora_lib.flatten(trainable["full"]) if trainable["full"] else None
  return peft.save_peft(out, trainable["lora"], s.spec, s.model_cfg, full=full,
                        base_model=os.path.abspath(run.model_path))


def merge_run(run_dir: str, out: str, step: int | None = None,
              max_shard_size: str | int = "5GB", base=None) -> str:
  """``jlora merge RUN_DIR --out DIR`` (``base`` as in ``export_run``)."""
  run = rundir.load_trained(run_dir, step, base)
  s, trainable = run.setup, run.trainable
  params = optim.combine(trainable["full"], s.frozen)
  return merged.save_merged(out, params, trainable["lora"],
                            s.plan if trainable["lora"] else None, s.model_cfg,
                            run.model_path, s.tok, max_shard_size=max_shard_size)
