"""``jlora study`` end to end: ``jlora study all`` at the smoke budget with 2 seeds (every
study's results rows, plots, report with mean +- s.e., record; the index) and a killed study
continuing with the same results."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest


def _study(*args):
  return subprocess.run([sys.executable, "-m", "jlora.cli", "study", *args],
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_study_all_at_the_smoke_budget_with_two_seeds(tmp_path):
  out = tmp_path / "all"
  done = _study("all", "--budget", "smoke", "--seeds", "2", "--out", str(out))
  assert done.returncode == 0, done.stderr[-3000:]
  index = (out / "index.md").read_text()
  for name in ("layers", "lr", "rank", "batch", "capacity", "rl", "compute"):
    verdict = _check_smoke(name, out / name, done)
    row = next(line for line in index.splitlines() if f"]({name}/report.md)" in line)
    assert f"| {verdict} |" in row and row.endswith(" min |")
    report = (out / name / "report.md").read_text()
    if name == "compute":
      assert "*Deterministic: no seeds" in report and "| - |" in row
      continue
    assert report.splitlines()[2].startswith("*2 seeds:") and "| 2 |" in row
    rows = [json.loads(line) for line in open(out / name / "results.jsonl")]
    assert {r["seed"] for r in rows} == {0, 1}, name
    assert " ± " in row or " (x/ " in row or name == "capacity", row  # mean ± s.e.
  assert "jlora study all --budget smoke --seeds 2" in index


def _check_smoke(name, out, done):
  assert done.returncode == 0, done.stderr[-3000:]
  report = (out / "report.md").read_text()
  assert "**Verdict: " in report and "jlora study " + name in report
  verdict = report.split("**Verdict: ")[1].split(".**")[0]
  for png in [line.split("(")[1].rstrip(")") for line in report.splitlines()
              if line.startswith("![")]:
    assert (out / png).stat().st_size > 1000
  assert any(line.startswith("![") for line in report.splitlines())
  record = json.loads((out / "study.json").read_text())
  assert record["verdict"] == verdict and record["wall_s"] > 0
  assert record["invocations"][0]["machine"]["cpu"]
  rows = [json.loads(line) for line in open(out / "results.jsonl")]
  assert rows and (out / "results.csv").read_text().count("\n") == len(rows) + 1
  if name == "compute":
    # XLA's count against the analytic one where matmuls dominate (the widest layer): no
    # weight gradients for frozen weights (with them the ratio would be above 1)
    widest = max(rows, key=lambda r: r["width"])
    assert abs(widest["FLOP ratio"] - widest["formula (2N^2+6Nr)/3N^2"]) < 0.05, widest
    return verdict
  arms = {}
  for r in rows:
    arms.setdefault(r["arm"], []).append(r)
  assert len(arms) >= 2
  for arm, rs in arms.items():  # every logged step of a finished arm, once
    if rs[0]["status"] == "done":
      cfg = json.loads(open(next((out / "arms").glob(f"{arm}-*")) / "config.json").read())
      steps = cfg["train"]["steps"]
      every = cfg["train"]["log_every"]
      assert [r["step"] for r in rs] == [0] + list(range(every, steps + 1, every)), arm
      assert all(math.isfinite(r["loss"]) for r in rs[1:])
  return verdict


@pytest.mark.slow
def test_a_killed_study_continues_with_the_same_results_and_seeds_are_arms(tmp_path):
  """The rank study's LoRA arms train as one group; killed after a checkpoint, it resumes
  to the uninterrupted study's results; rerun with --seeds 2 it keeps the finished arms and
  trains each arm's seed 1, whose rows are those of the study run at that seed alone."""
  every = ("--set", "train.checkpoint_every=2")
  whole_dir = tmp_path / "whole"  # uninterrupted: also the rank study's smoke check
  whole = _study("rank", "--budget", "smoke", "--out", str(whole_dir), *every)
  _check_smoke("rank", whole_dir, whole)
  assert "r1, r4: training together" in whole.stdout
  out = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "jlora.cli", "study", "rank", "--budget",
                           "smoke", "--out", str(out), *every], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while time.time() < deadline:  # kill once the group saved its first checkpoint
    if list(out.glob("arms/r1-*/checkpoints/2")):
      break
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "report.md").exists()
  again = _study("rank", "--budget", "smoke", "--out", str(out), *every)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "r1, r4: resuming together" in again.stdout
  # Timings differ, and so does the hash: it covers the model's path (each DIR makes its own
  # tiny model). Losses, steps and everything else must be identical.
  strip = lambda r: {k: v for k, v in r.items()  # noqa: E731
                     if k not in ("elapsed_s", "step_s", "data_s", "tokens_per_s", "hash")}
  load = lambda d: [strip(json.loads(line)) for line in open(d / "results.jsonl")]  # noqa
  assert load(out) == load(whole_dir)
  more = _study("rank", "--budget", "smoke", "--out", str(out), *every, "--seeds", "2")
  assert more.returncode == 0, more.stderr[-2000:]
  assert "r1: finished earlier (done), skipped" in more.stdout
  assert "r4: finished earlier (done), skipped" in more.stdout
  assert "r1-seed1, r4-seed1: training together" in more.stdout
  report = (out / "report.md").read_text()
  assert report.splitlines()[2].startswith("*2 seeds: every number is the mean +- one standard")
  assert "| r1 | 2 | done |" in report  # one table row per arm, its seeds counted
  alone_dir = tmp_path / "seed1"  # seed 1 alone: train.seed and the data order moved by 1
  alone = _study("rank", "--budget", "smoke", "--out", str(alone_dir), *every,
                 "--set", "train.seed=1", "--set", "data.shuffle_seed=1")
  assert alone.returncode == 0, alone.stderr[-2000:]
  rows = load(out)
  assert {r["seed"] for r in rows} == {0, 1}
  for arm in ("r1", "r4"):
    seed1 = [{**r, "arm": arm, "seed": 0} for r in rows if r["arm"] == f"{arm}-seed1"]
    assert seed1 and seed1 == [r for r in load(alone_dir) if r["arm"] == arm], arm
    seed0 = [r for r in rows if r["arm"] == arm]
    assert [r.get("loss") for r in seed0] != [r.get("loss") for r in seed1]  # seeds differ
  record = json.loads((out / "study.json").read_text())
  assert len(record["invocations"]) == 3
