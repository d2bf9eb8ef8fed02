"""What the supervised studies share: ``layers`` (FINDINGS 1), ``lr`` (2), ``rank`` (3) and
``batch`` (4), one module each beside this one.

The post's protocol at the budget's scale: constant LR, no warm-up, one pass over the data
(a text corpus never repeats within an arm), held-out log-loss as the metric, alpha = 32.
The metric is the loss over the last quarter of the steps: each batch is scored before
the model trains on it, so it is held-out (progressive validation), averaged over a
quarter of the run instead of one noisy evaluation of the last step's weights at a small
batch (why: bench/RESULTS.md, "Findings studies"); the final weights' loss on the held-out
split is in every table too.
Every arm reads the same base config, so the same batches in the same order (one data
seed) and the same held-out batches; they differ only in what the arm overrides.

Data: ``smoke`` trains the tiny random model on ``task:arithmetic``; ``small`` and ``full``
train on the ``fortunes`` corpus (real English text from Debian, fetched once), split into
training and held-out documents by a hash of each document (``assets.text_split``).
``--set data.source=... eval.source=...`` studies other data.
"""

from __future__ import annotations

import math
import os

from jlora import models
from jlora.run import config as config_lib
from jlora.study import assets, runner
from jlora.study.registry import Context


METRIC = "Loss: the last quarter of training (each batch scored before it is trained on)."


def model_path(ctx: Context) -> str:
  if ctx.model:
    return ctx.model
  if ctx.budget == "smoke":
    return assets.tiny_model(os.path.join(ctx.out, "model"))
  return config_lib.SMOLLM2


def model_config(path: str):
  return models.read_config(path)  # the smollm2 alias and Hub ids resolve there


def base_values(ctx: Context, steps: int) -> dict:
  """The base run config of an SFT study at ``ctx.budget`` (arms override parts)."""
  path = model_path(ctx)
  if ctx.budget == "smoke":
    data = {"source": "task:arithmetic", "chat": False, "size": 4000, "seq_len": 32,
            "batch_size": 4}
    held_out = {"batches": 2}
  else:
    train, test = assets.text_split("fortunes", os.path.join(ctx.out, "data"))
    data = {"source": train, "seq_len": ctx.pick(32, 64, 512),
            "batch_size": ctx.pick(4, 4, 32)}
    held_out = {"source": test, "batches": ctx.pick(2, 4, 32)}
  return {
      "model": {"path": path, "remat": ctx.budget == "full"},
      "lora": {"alpha": 32.0},
      "train": {"steps": steps, "schedule": "constant", "warmup_steps": 0, "log_every": 1,
                "checkpoint_every": steps, "keep": 1, "seed": 0},
      "data": {**data, "seed": 0, "prefetch": 0},
      "eval": {**held_out, "examples": 0, "every": 0},
  }


def base(ctx: Context, steps: int):
  """(base values, the model's config) of an SFT study."""
  values = base_values(ctx, steps)
  return values, model_config(values["model"]["path"])


def arm(name: str, series: str, x, **sections) -> runner.Arm:
  return runner.Arm(name, series, x, sections)


def fmt_lr(lr: float) -> str:
  return f"{lr:.2g}".replace("e-0", "e-")


def metric(r: runner.ArmResult) -> float | None:
  """What the SFT studies compare: ``late_loss`` (held-out by construction, see there);
  the evaluation of the final weights on the held-out split is reported beside it."""
  value = r.late_loss()
  return value if value is not None and math.isfinite(value) else None


def best_arm(results) -> list[runner.ArmResult] | None:
  """Of ``results`` (arms of one condition, every seed), the seeds of the arm with the
  lowest mean loss over its seeds (the post's minimum over LRs); None when no arm
  finished at every seed."""
  return runner.best_arm(results, metric)
