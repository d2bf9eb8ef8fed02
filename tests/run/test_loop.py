"""jlora.run.loop: a non-finite loss stops the run and keeps the last good checkpoint."""

import json
import os

import numpy as np
import pytest

from jlora.objectives import sft
from jlora.run import config, loop
from tests.helpers import recipe


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(model_dir, tmp_path):
  cfg = config.from_dict(recipe(model_dir, tmp_path / "run", lr=1e30, grad_clip=None,
                                steps=12))
  with pytest.raises(loop.NonFiniteLoss, match="non-finite at step") as info:
    sft.run(cfg, progress=False, log=lambda _: None)
  message = str(info.value)
  bad = int(message.split("non-finite at step ")[1].split(" ")[0])
  kept = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert all(k < bad for k in kept)
  assert (f"step {kept[-1]}" if kept else "none") in message.split("last good checkpoint")[1]
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 0 and "loss" not in rows[0]  # held-out metrics before training
  assert all(np.isfinite(r["loss"]) for r in rows[1:]) and all(r["step"] < bad for r in rows)
