"""The run directory: created or checked for --resume, metrics files, JSON and adapter files
written atomically (``.tmp`` + rename), so a crash never leaves a half-written file.

    RUN_DIR/config.json      the resolved config (what --resume and jlora generate read)
    RUN_DIR/start.json       held-out loss / accuracy before training
    RUN_DIR/metrics.jsonl    one line per logged step (and metrics.csv, tb/ for TensorBoard)
    RUN_DIR/checkpoints/N/   orbax: trainable state, optimizer, data iterator, meta
    RUN_DIR/adapters.safetensors  the final LoRA factors (flat "path/a", "path/b")
    RUN_DIR/summary.json     loss and accuracy before/after, throughput, sizes

Nothing existing is overwritten: a fresh run refuses a non-empty directory, ``--resume``
refuses a changed model, LoRA spec, method or data, and metrics logged after the last
checkpoint (by a run that was killed) are dropped when it resumes, so the files always
describe the one trajectory the checkpoints continue.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np

from jlora import config as config_lib
from jlora import lora

# Config sections that must not change across --resume (they define the state on disk).
_FROZEN_ON_RESUME = ("model", "lora", "train.method", "train.seed", "data", "mesh")



def prepare(cfg: config_lib.RunConfig, resume: bool) -> str:
  run_dir = os.path.abspath(cfg.run_dir)
  saved = os.path.join(run_dir, "config.json")
  if resume:
    if not os.path.isfile(saved):
      raise ValueError(f"{run_dir}: nothing to resume (no config.json)")
    with open(saved) as f:
      before = json.load(f)
    now = cfg.to_dict()
    for key in _FROZEN_ON_RESUME:
      a, b = before, now
      for part in key.split("."):
        a, b = a.get(part), b.get(part)
      if a != b:
        raise ValueError(f"cannot resume {run_dir}: {key} changed (saved {json.dumps(a)}, "
                         f"now {json.dumps(b)})")
  else:
    if os.path.isdir(run_dir) and os.listdir(run_dir):
      raise ValueError(f"{run_dir} already holds a run: add --resume to continue it, or "
                       "set run_dir to a new directory")
    try:
      os.makedirs(run_dir, exist_ok=True)
      with open(saved, "w") as f:
        f.write(cfg.to_json())
    except OSError as e:
      raise ValueError(f"{run_dir}: cannot write the run directory ({e.strerror})") from None
  if not os.access(run_dir, os.W_OK):
    raise ValueError(f"{run_dir}: cannot write the run directory (permission denied)")
  return run_dir


class Metrics:
  """metrics.jsonl + metrics.csv + TensorBoard (tensorboardX) in the run directory."""

  FIELDS = ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "eval_loss",
            "elapsed_s")

  def __init__(self, run_dir: str, resume_step: int | None):
    self.jsonl = os.path.join(run_dir, "metrics.jsonl")
    self.csv = os.path.join(run_dir, "metrics.csv")
    if resume_step is not None:  # drop what a killed run logged after its last checkpoint
      for path in (self.jsonl, self.csv):
        if os.path.isfile(path):
          self._truncate(path, resume_step)
    new_csv = not os.path.isfile(self.csv)
    self._csv_file = open(self.csv, "a", newline="")
    self._csv = csv.DictWriter(self._csv_file, self.FIELDS, extrasaction="ignore")
    if new_csv:
      self._csv.writeheader()
    self._jsonl_file = open(self.jsonl, "a")
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

  @staticmethod
  def _truncate(path: str, step: int) -> None:
    with open(path) as f:
      lines = f.readlines()
    keep = []
    for i, line in enumerate(lines):
      if path.endswith(".csv") and i == 0:
        keep.append(line)
        continue
      try:
        value = json.loads(line)["step"] if path.endswith(".jsonl") else int(line.split(",")[0])
      except (ValueError, KeyError):
        continue  # a line cut short by the kill
      if value <= step and line.endswith("\n"):
        keep.append(line)
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)

  def write(self, row: dict) -> None:
    self._jsonl_file.write(json.dumps(row) + "\n")
    self._jsonl_file.flush()
    self._csv.writerow(row)
    self._csv_file.flush()
    for k, v in row.items():
      if k != "step" and v is not None:
        self._tb.add_scalar(k, v, row["step"])

  def close(self) -> None:
    self._jsonl_file.close()
    self._csv_file.close()
    self._tb.close()


def write_json(path: str, value: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def save_adapters(path: str, adapters: Any, spec: lora.LoraSpec) -> None:
  from safetensors.numpy import save_file
  flat = {p: np.asarray(x) for p, x in lora.flatten(adapters).items()}
  save_file(flat, path + ".tmp", metadata={"format": "jlora", "rank": str(spec.rank),
                                          "alpha": str(spec.alpha)})
  os.replace(path + ".tmp", path)
