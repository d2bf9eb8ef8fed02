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
from jlora.run import build, checkpoint, config as config_lib, driver, group, loop
from jlora.study import verdicts

LEAD = ("study", "arm", "series", "x", "seed", "status", "step")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One condition of a study: ``overrides`` (nested config keys) over the base config;
  ``series`` groups arms into a plotted line, ``x`` is the swept value (LR, batch, rank)."""
  name: str
  series: str
  x: float | None
  overrides: dict
  seed: int = 0  # ``seeded``: seed k > 0 varies the adapter init and the data order

  @property
  def base(self) -> str:
    """The arm's name at seed 0 (``seeded`` appends ``-seedK``)."""
    return self.name.removesuffix(f"-seed{self.seed}") if self.seed else self.name


def seeded(arms: Sequence[Arm], values: dict, seeds: int) -> list[Arm]:
  """``arms`` at ``seeds`` seeds: seed 0 is each arm itself (so a study rerun with more
  seeds reuses what it finished), seed k its copy ``NAME-seedK`` with ``train.seed`` and
  the data's order seed (``data.shuffle_seed``: the example order, RL's prompt order)
  moved by k. The base model, the data's records (``data.seed``) and the held-out set stay:
  the seeds measure the noise of the init and the order."""
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")
  out = []
  for arm in arms:
    cfg = merge(values, arm.overrides)
    train_seed = cfg.get("train", {}).get("seed", 0)
    data = cfg.get("data", {})
    order = data.get("shuffle_seed")
    order = data.get("seed", 0) if order is None else order
    out.append(arm)
    out += [dataclasses.replace(arm, name=f"{arm.name}-seed{k}", seed=k, overrides=merge(
        arm.overrides, {"train": {"seed": train_seed + k}, "data": {"shuffle_seed": order + k}}))
            for k in range(1, seeds)]
  return out


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
  # data.shuffle_seed likewise: left out while unset (None), as before it existed
  resolved = cfg.to_dict()
  if resolved["data"].get("shuffle_seed") is None:
    resolved["data"].pop("shuffle_seed", None)
  text = json.dumps({"rl": None, **resolved, "run_dir": None}, sort_keys=True)
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
             log: Callable[[str], None] = print, keep_checkpoints: bool = False,
             together: bool = True) -> list[ArmResult]:
  """Run every arm not yet finished, the base model loaded once for all of them; returns
  every arm's result, in order. Arms that can train together (``_together``: LoRA arms of
  an objective that trains groups, sharing what a group shares) run as one group
  (``driver.run_group``: one step over their stacked adapters, each arm's trajectory its
  solo run's); the rest, FullFT arms among them, one after another (``driver.run``). A
  finished arm's checkpoints are deleted unless ``keep_checkpoints`` (its metrics, summary
  and adapters stay): a FullFT arm's hold the whole model and both Adam moments.
  ``together=False`` runs every arm alone (bench/study_group.py's baseline)."""
  configs = [(arm, *arm_config(values, arm, out)) for arm in arms]
  names = [arm.name for arm in arms]
  if len(set(names)) != len(names):
    raise ValueError(f"study {study}: arm names repeat: {names}")
  shared = {(c.model, c.mesh) for _, c, _ in configs}
  if len(shared) > 1:
    raise ValueError(f"study {study}: arms must share the model and mesh sections")
  base, results, todo = None, {}, []
  os.makedirs(os.path.join(out, "logs"), exist_ok=True)
  for i, (arm, cfg, digest) in enumerate(configs):
    done = _load(arm, digest, cfg.run_dir)
    if done is not None:
      log(f"[{i + 1}/{len(configs)}] {arm.name}: finished earlier ({done.status}), skipped")
      results[i] = done
    else:
      todo.append(i)
  batches = _together(todo, [c for _, c, _ in configs]) if together else [[i] for i in todo]
  for batch in batches:
    arms_cfgs = [configs[i] for i in batch]
    cfg = arms_cfgs[0][1]
    if base is None:
      base = build.load_base(cfg, build.reading(cfg), log, shared=True)
    count = ",".join(f"{i + 1}" for i in batch) + f"/{len(configs)}"
    ran = (_run_arms_together(arms_cfgs, base, out, log, count) if len(batch) > 1 else
           [_run_arm(*arms_cfgs[0], base, out, log, count)])
    for i, result in zip(batch, ran):
      results[i] = result
      if not keep_checkpoints:
        checkpoint.remove(configs[i][1].run_dir)
    write_results(study, [results[i] for i in sorted(results)], out)
  ordered = [results[i] for i in range(len(configs))]
  write_results(study, ordered, out)
  return ordered


def _together(todo: list[int], cfgs: list[config_lib.RunConfig]) -> list[list[int]]:
  """The arms ``todo`` as batches to run: arms that can train as a group (LoRA, an
  objective with a group, no ``lora.full`` / ``lora.init`` / MoE-expert targets, equal
  ``group.SHARED`` keys and the objective's own, all fresh or all resuming) and have the
  same rows per step (a group pads a run's rows to the most: the batch study's batch-1 arm
  beside its batch-64 one would cost 64 times its own work) in one batch each, every other
  arm alone; in the order of their first arm."""
  batches: dict = {}
  for i in todo:
    cfg, kind = cfgs[i], driver.kind_of(cfgs[i])
    key = ("alone", i)
    if (kind.group is not None and cfg.train.method == "lora" and not cfg.lora.full
        and cfg.lora.init is None and not _on_experts(cfg)):
      values = cfg.to_dict()
      key = (kind.command, fs.is_file(fs.join(cfg.run_dir, "config.json")),
             kind.group.rows(cfg),
             json.dumps([group.shared_values(values, k)
                         for k in group.SHARED + kind.group.shared], sort_keys=True))
    batches.setdefault(key, []).append(i)
  return list(batches.values())


def _on_experts(cfg: config_lib.RunConfig) -> bool:
  """Whether the arm's adapters reach MoE experts (a group cannot stack those yet)."""
  plan = build.abstract_plan(cfg, build.reading(cfg).model_cfg)
  return any("e" in t.layout for t in plan.targets.values())


def _arm_log(out: str, names: Sequence[str]):
  """A log that appends each line to every named arm's ``logs/NAME.log``."""
  def log(line: str) -> None:
    for name in names:
      with open(os.path.join(out, "logs", f"{name}.log"), "a") as f:
        f.write(line + "\n")
  return log


def _run_arm(arm, cfg, digest, base, out, log, count) -> ArmResult:
  resume = fs.is_file(fs.join(cfg.run_dir, "config.json"))
  log(f"[{count}] {arm.name}: {'resuming' if resume else 'training'} "
      f"({json.dumps(arm.overrides, sort_keys=True)})")
  start = time.perf_counter()
  status, summary, message = "done", {}, ""
  arm_log = _arm_log(out, [arm.name])
  try:
    summary = driver.run(cfg, driver.kind_of(cfg), resume=resume, progress=False,
                         log=arm_log, force=True, base=base)
  except loop.NonFiniteLoss as e:
    status, message = "diverged", str(e)
    arm_log(message)
  return _record(arm, cfg, digest, status, summary, message, time.perf_counter() - start, log,
                 count)


def _run_arms_together(arms_cfgs, base, out, log, count) -> list[ArmResult]:
  """Arms as one group (``driver.run_group``); each arm's wall time is its share of the
  group's (the group's own is in arm.json as ``group_wall_s``)."""
  cfgs = [cfg for _, cfg, _ in arms_cfgs]
  names = [arm.name for arm, _, _ in arms_cfgs]
  resume = fs.is_file(fs.join(cfgs[0].run_dir, "config.json"))
  log(f"[{count}] {', '.join(names)}: {'resuming' if resume else 'training'} together, "
      "one step over their stacked adapters")
  start = time.perf_counter()
  outcomes = driver.run_group(cfgs, driver.kind_of(cfgs[0]), names, resume=resume,
                              progress=False, log=_arm_log(out, names), force=True, base=base)
  wall = time.perf_counter() - start
  out_results = []
  for (arm, cfg, digest), outcome in zip(arms_cfgs, outcomes):
    diverged = isinstance(outcome, loop.NonFiniteLoss)
    message = str(outcome) if diverged else ""
    if diverged:
      _arm_log(out, [arm.name])(message)
    out_results.append(_record(arm, cfg, digest, "diverged" if diverged else "done",
                               {} if diverged else outcome, message, wall / len(cfgs), log,
                               count, {"group": names, "group_wall_s": wall}))
  return out_results


def _record(arm, cfg, digest, status, summary, message, wall, log, count, extra=None
            ) -> ArmResult:
  """arm.json (what makes the arm finished) and the arm's result."""
  fs.write_json(os.path.join(cfg.run_dir, "arm.json"),
                {"arm": dataclasses.asdict(arm), "hash": digest, "status": status,
                 "summary": summary, "wall_s": wall, "message": message, **(extra or {})})
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
                  "seed": r.arm.seed, "status": r.status, "hash": r.hash, **row})
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
  """Seed 0's results by series (a plotted line of arms)."""
  out: dict[str, list[ArmResult]] = {}
  for r in results:
    if r.arm.seed == 0:
      out.setdefault(r.arm.series, []).append(r)
  return out


def by_arm(results: Sequence[ArmResult]) -> dict[str, list[ArmResult]]:
  """Every seed's result of each arm ({the arm's seed-0 name: results by seed}), in the
  order the arms were declared."""
  out: dict[str, list[ArmResult]] = {}
  for r in sorted(results, key=lambda r: r.arm.seed):
    out.setdefault(r.arm.base, []).append(r)
  return out


def best_arm(results: Sequence[ArmResult], value: Callable[[ArmResult], float | None]
             ) -> list[ArmResult] | None:
  """Every seed's result of the arm whose mean ``value`` over its seeds is lowest (the
  post's minimum over LRs); None when no arm has a value at every seed."""
  groups = by_arm(results)
  means = {name: e.mean for name, seeds in groups.items()
           if (e := verdicts.estimate([value(r) for r in seeds])) is not None}
  return groups[min(means, key=means.get)] if means else None


def per_seed(group: Sequence[ArmResult], value: Callable[[ArmResult], float | None]
             ) -> dict[int, float | None]:
  """{seed: value(result)} of one arm's seeds."""
  return {r.arm.seed: value(r) for r in group}


def mean_curve(group: Sequence[ArmResult], key: str = "loss"
               ) -> list[tuple[int, float, float | None]]:
  """(step, mean over seeds, standard error or None) at the steps every seed logged."""
  curves = [dict(r.curve(key)) for r in group if r.curve(key)]
  if not curves:
    return []
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  out = []
  for step in steps:
    e = verdicts.estimate([c[step] for c in curves])
    if e is not None:
      out.append((step, e.mean, e.se))
  return out


def mean_se(seeds: Sequence[ArmResult], value: Callable[[ArmResult], float | None],
            spec: str = ".4f"):
  """A table cell: the value at one seed, "mean ± s.e." at several, None if one is
  missing."""
  e = verdicts.estimate([value(r) for r in seeds])
  return None if e is None else (e.mean if e.se is None else e.format(spec))


def summary_table(results: Sequence[ArmResult], extra: Callable[[ArmResult], dict] | None
                  = None) -> list[dict[str, Any]]:
  """One dict per arm for the report: name, seeds, statuses, tokens, held-out loss
  before/after and the last-quarter loss (mean +- s.e. over seeds), wall time (all seeds),
  plus ``extra(seed 0's result)``."""
  table = []
  for name, seeds in by_arm(results).items():
    row = {"arm": name, "seeds": len(seeds),
           "status": "/".join(sorted({r.status for r in seeds})), "tokens": seeds[0].tokens,
           "held-out loss before": seeds[0].summary.get("eval_loss_before"),
           "held-out loss after": mean_se(seeds, ArmResult.final),
           "last-quarter loss": mean_se(seeds, ArmResult.late_loss),
           "wall s": round(sum(r.wall_s for r in seeds))}
    row.update(extra(seeds[0]) if extra else {})
    table.append(row)
  return table
