"""The arms of a study, each a run of the shared run loop, over one loaded base model.

An arm is a set of run-config overrides over the study's base config. Its run directory
is ``DIR/arms/NAME-HASH``, the hash taken over its resolved config (run_dir aside): an arm
whose directory holds ``arm.json`` is finished (or diverged) and is skipped when the study
runs again; one that was cut short resumes from its last checkpoint (``--resume`` of the
run loop: bit-exact on CPU). A changed config (``--set``, another model, a new jlora
default) is a new hash, so a new arm. Diverged arms (``loop.NonFiniteLoss``) are kept,
with their logged steps, and marked. After every arm, ``results.jsonl`` and
``results.csv`` (one row per arm and logged step) are written anew from all arms so far.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Any, Callable, Sequence

from jlora.infra import fs
from jlora.run import build, checkpoint, config as config_lib, driver, loop

LEAD = ("study", "arm", "series", "x", "status", "step")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One condition of a study: ``overrides`` (nested config keys) over the base config;
  ``series`` groups arms into a plotted line, ``x`` is the swept value (LR, batch, rank)."""
  name: str
  series: str
  x: float | None
  overrides: dict


@dataclasses.dataclass
class ArmResult:
  arm: Arm
  hash: str
  status: str  # "done" or "diverged"
  summary: dict
  rows: list[dict]  # the arm's metrics.jsonl: step 0 (before training) and logged steps
  wall_s: float
  message: str = ""

  def final(self, key: str = "eval_loss") -> float | None:
    """The held-out metric after training (None for a diverged arm)."""
    return self.summary.get(f"{key}_after") if self.status == "done" else None

  def late_loss(self) -> float | None:
    """Mean training loss over the last quarter of the steps (None unless done). Each
    batch is scored before the model trains on it and a study's text is seen once, so
    this is a held-out log-loss (progressive validation) over ~steps/4 batches: less noisy
    at a small batch than one evaluation of the final step's weights."""
    points = self.curve()
    if self.status != "done" or not points:
      return None
    last = points[-1][0]
    late = [v for step, v in points if step > 0.75 * last] or [points[-1][1]]
    return sum(late) / len(late)

  def curve(self, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in self.rows if r["step"] > 0 and r.get(key) is not None]

  @property
  def tokens(self) -> int:
    """Loss tokens the arm trained on (every step is logged in a study)."""
    return int(sum(r.get("tokens") or 0 for r in self.rows if r["step"] > 0))


def merge(base: dict, over: dict) -> dict:
  """``over``'s keys over ``base``'s, nested dicts merged key by key."""
  out = dict(base)
  for key, value in over.items():
    out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(
        out.get(key), dict) else value
  return out


def arm_config(values: dict, arm: Arm, out: str) -> tuple[config_lib.RunConfig, str]:
  """The arm's validated run config and its hash (over the resolved config, run_dir
  aside, so jlora's defaults are part of it)."""
  values = merge(values, arm.overrides)
  cfg = config_lib.from_dict({**values, "run_dir": "."})
  # "rl": null: how configs without an objective section were written when the arms of
  # studies on disk were hashed; kept so those studies continue instead of retraining
  text = json.dumps({"rl": None, **cfg.to_dict(), "run_dir": None}, sort_keys=True)
  digest = hashlib.sha256(text.encode()).hexdigest()[:10]
  run_dir = os.path.join(out, "arms", f"{arm.name}-{digest}")
  return dataclasses.replace(cfg, run_dir=run_dir), digest


def _read_rows(run_dir: str) -> list[dict]:
  path = fs.join(run_dir, "metrics.jsonl")
  if not fs.is_file(path):
    return []
  return [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]


def _load(arm: Arm, digest: str, run_dir: str) -> ArmResult | None:
  path = fs.join(run_dir, "arm.json")
  if not fs.is_file(path):
    return None
  saved = fs.read_json(path)
  return ArmResult(arm, digest, saved["status"], saved["summary"], _read_rows(run_dir),
                   saved["wall_s"], saved.get("message", ""))


def run_arms(study: str, arms: Sequence[Arm], values: dict, out: str, *,
             log: Callable[[str], None] = print, keep_checkpoints: bool = False
             ) -> list[ArmResult]:
  """Run every arm not yet finished (``driver.run`` with the objective its config is for),
  the base model loaded once for all of them; returns every arm's result, in order. A
  finished arm's checkpoints are deleted unless ``keep_checkpoints`` (its metrics, summary
  and adapters stay): a FullFT arm's hold the whole model and both Adam moments."""
  configs = [(arm, *arm_config(values, arm, out)) for arm in arms]
  names = [arm.name for arm in arms]
  if len(set(names)) != len(names):
    raise ValueError(f"study {study}: arm names repeat: {names}")
  shared = {(c.model, c.mesh) for _, c, _ in configs}
  if len(shared) > 1:
    raise ValueError(f"study {study}: arms must share the model and mesh sections")
  base, results = None, []
  os.makedirs(os.path.join(out, "logs"), exist_ok=True)
  for i, (arm, cfg, digest) in enumerate(configs, 1):
    done = _load(arm, digest, cfg.run_dir)
    if done is not None:
      log(f"[{i}/{len(configs)}] {arm.name}: finished earlier ({done.status}), skipped")
      results.append(done)
      continue
    if base is None:
      base = build.load_base(cfg, build.reading(cfg), log, shared=True)
    results.append(_run_arm(arm, cfg, digest, base, out, log, f"{i}/{len(configs)}"))
    if not keep_checkpoints:
      checkpoint.remove(cfg.run_dir)
    write_results(study, results, out)
  write_results(study, results, out)
  return results


def _run_arm(arm, cfg, digest, base, out, log, count) -> ArmResult:
  resume = fs.is_file(fs.join(cfg.run_dir, "config.json"))
  log(f"[{count}] {arm.name}: {'resuming' if resume else 'training'} "
      f"({json.dumps(arm.overrides, sort_keys=True)})")
  start = time.perf_counter()
  status, summary, message = "done", {}, ""
  with open(os.path.join(out, "logs", f"{arm.name}.log"), "a") as f:
    arm_log = lambda line: (f.write(line + "\n"), f.flush())  # noqa: E731
    try:
      summary = driver.run(cfg, driver.kind_of(cfg), resume=resume, progress=False,
                           log=arm_log, force=True, base=base)
    except loop.NonFiniteLoss as e:
      status, message = "diverged", str(e)
      arm_log(message)
  wall = time.perf_counter() - start
  fs.write_json(os.path.join(cfg.run_dir, "arm.json"),
                    {"arm": dataclasses.asdict(arm), "hash": digest, "status": status,
                     "summary": summary, "wall_s": wall, "message": message})
  result = ArmResult(arm, digest, status, summary, _read_rows(cfg.run_dir), wall, message)
  final = result.final()
  log(f"[{count}] {arm.name}: {status}" + (f", held-out loss {final:.4f}" if final else "") +
      f" ({wall:.0f} s)")
  return result


def rows(study: str, results: Sequence[ArmResult]) -> list[dict]:
  """One row per arm and logged step."""
  out = []
  for r in results:
    for row in r.rows:
      out.append({"study": study, "arm": r.arm.name, "series": r.arm.series, "x": r.arm.x,
                  "status": r.status, "hash": r.hash, **row})
  return out


def write_table(path_stem: str, table: Sequence[dict]) -> None:
  """``STEM.jsonl`` and ``STEM.csv`` (the LEAD columns first, then the rest sorted),
  each written to a temporary file and renamed into place."""
  keys = [k for k in LEAD if any(k in r for r in table)]
  keys += sorted({k for r in table for k in r} - set(keys))
  text = "".join(json.dumps(r) + "\n" for r in table)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(table)
  fs.write_text(path_stem + ".jsonl", text)
  fs.write_text(path_stem + ".csv", buf.getvalue())


def write_results(study: str, results: Sequence[ArmResult], out: str) -> None:
  write_table(os.path.join(out, "results"), rows(study, results))


def by_series(results: Sequence[ArmResult]) -> dict[str, list[ArmResult]]:
  out: dict[str, list[ArmResult]] = {}
  for r in results:
    out.setdefault(r.arm.series, []).append(r)
  return out


def summary_table(results: Sequence[ArmResult], extra: Callable[[ArmResult], dict] | None
                  = None) -> list[dict[str, Any]]:
  """One dict per arm for the report: name, series, x, status, tokens, held-out loss
  before/after, wall time, plus ``extra(result)``."""
  table = []
  for r in results:
    row = {"arm": r.arm.name, "status": r.status, "tokens": r.tokens,
           "held-out loss before": r.summary.get("eval_loss_before"),
           "held-out loss after": r.final(), "last-quarter loss": r.late_loss(),
           "wall s": round(r.wall_s)}
    row.update(extra(r) if extra else {})
    table.append(row)
  return table
