"""``jlora export`` and ``jlora merge``: a trained run directory's adapters as a PEFT
adapter (``jlora.peft``) or merged into an HF model directory (``jlora.merged``)."""

from __future__ import annotations

from jlora import hub, lora as lora_lib, merged, optim, peft, rundir


def export_run(run_dir: str, out: str, step: int | None = None, base=None,
               moe_layout: str = "per-expert") -> str:
  """``jlora export RUN_DIR --format peft --out DIR [--moe-layout fused]`` (``base``: the
  model already loaded, as in ``rundir.load_trained``; ``moe_layout``: ``peft.MOE_LAYOUTS``)."""
  run = rundir.load_trained(run_dir, step, base)
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
  run = rundir.load_trained(run_dir, step, base)
  s, trainable = run.setup, run.trainable
  params = optim.combine(trainable["full"], s.frozen)
  return merged.save_merged(out, params, trainable["lora"],
                            s.plan if trainable["lora"] else None, s.model_cfg,
                            run.model_path, s.tok, max_shard_size=max_shard_size,
                            dtype=merged.NAMES.get(dtype))
