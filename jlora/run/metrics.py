"""A run's metrics files: ``metrics.jsonl`` (every field of every row), ``metrics.csv``
(the fixed columns) and TensorBoard event files (``tb/``, tensorboardX), written by
process 0 only; row 0 holds the held-out metrics before training. Reopened on resume, the
files drop the rows a killed run logged after its last checkpoint, so they describe the
one trajectory the checkpoints continue.
"""

from __future__ import annotations

import csv
import io
import json

from jlora.infra import fs, multihost


class Metrics:
  """metrics.jsonl + metrics.csv + TensorBoard (tensorboardX) in the run directory.

  Args:
    run_dir: the run directory.
    keep_through: rows with ``step <= keep_through`` already in the files are kept, later
      ones dropped (a killed run's rows past its last checkpoint); None keeps everything.
    fields: the CSV columns (JSONL and TensorBoard take whatever a row has).
  """

  FIELDS = ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "eval_loss",
            "accuracy", "elapsed_s", "step_s", "data_s")

  def __init__(self, run_dir: str, keep_through: int | None, fields=FIELDS):
    self.primary = multihost.primary()  # the other processes of a run write nothing
    self.jsonl = fs.join(run_dir, "metrics.jsonl")
    self.csv = fs.join(run_dir, "metrics.csv")
    if not self.primary:
      return
    if keep_through is not None:
      for path in (self.jsonl, self.csv):
        if fs.is_file(path):
          self._truncate(path, keep_through)
    self._fields = fields
    new_csv = not fs.is_file(self.csv)
    self._csv_out, self._jsonl_out = fs.Appender(self.csv), fs.Appender(self.jsonl)
    if new_csv:
      self._csv_out.write(self._csv_text(None))
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(fs.join(run_dir, "tb"))

  def _csv_text(self, row: dict | None) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, self._fields, extrasaction="ignore")
    if row is None:
      writer.writeheader()
    else:
      writer.writerow(row)
    return out.getvalue()

  @staticmethod
  def _truncate(path: str, step: int) -> None:
    lines = fs.read_text(path).splitlines(keepends=True)
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
    fs.write_text(path, "".join(keep))

  def write(self, row: dict) -> None:
    if self.primary:
      self._jsonl_out.write(json.dumps(row) + "\n")
      self._csv_out.write(self._csv_text(row))
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, row["step"])
      self._tb.flush()

  def close(self) -> None:
    if self.primary:
      self._jsonl_out.close()
      self._csv_out.close()
      self._tb.close()
