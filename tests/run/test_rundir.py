"""jlora.run.rundir: one trainer per run directory (two real processes), starts that saved
nothing do not block a rerun, the cloud-store branch (whole-object writes, an advisory
lock)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jlora import cli
from jlora.run import config
from tests.helpers import ROOT, assert_same_adapters, jlora_cli, recipe, steps_logged, write_toml


@pytest.mark.slow
def test_one_trainer_per_run_dir(model_dir, tmp_path):
  run = tmp_path / "run"
  values = recipe(model_dir, run, steps=100000, checkpoint_every=100000, log_every=1)
  toml = write_toml(tmp_path / "long.toml", values)
  first = subprocess.Popen([sys.executable, "-m", "jlora.cli", "train", toml, "--no-progress"],
                           cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
      assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
      time.sleep(0.5)
    # A second trainer, resuming or starting fresh, is refused with the holder's pid.
    for extra in (["--resume"], []):
      second = jlora_cli("train", toml, "--no-progress", *extra)
      assert second.returncode == 2, second.stderr
      assert second.stderr.count("\n") == 1
      assert f"is in use by process {first.pid} on " in second.stderr, second.stderr
    assert first.poll() is None  # the first one is unharmed
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The dead process's lock does not block, nor does what it left (it saved no step): a
  # plain rerun starts over (--resume too: the test below).
  assert (run / "config.json").exists() and not list((run / "checkpoints").glob("[0-9]*"))
  again = jlora_cli("train", toml, "--no-progress", "--set", "train.steps=2")
  assert again.returncode == 0, again.stderr[-2000:]
  assert steps_logged(run) == [0, 1, 2]


def test_a_start_killed_before_its_config_was_written_does_not_block_the_next(
    model_dir, tmp_path, capsys):
  from jlora.run import rundir
  run = tmp_path / "run"
  cfg = config.from_dict(recipe(model_dir, run))
  run.mkdir()
  (run / rundir.LOCK_FILE).write_text("")
  (run / "config.json.tmp").write_text('{"mod')  # killed mid-write: never renamed
  _, lock = rundir.create(cfg, resume=False)
  lock.release()
  assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
  # An empty config.json (what a non-atomic write leaves when killed) is named on resume.
  (run / "config.json").write_text("")
  assert cli.main(["train", write_toml(tmp_path / "r.toml", recipe(model_dir, run)),
                   "--resume"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{run}/config.json: not a readable run config" in err, err


def test_cloud_store_branch_whole_object_writes_and_an_advisory_lock(tmp_path, monkeypatch):
  """The object-store side of the path layer, run on local files: appends rewrite the
  whole object, and the lock is an advisory file that names its holder, goes when
  released, and stops counting once stale."""
  from jlora.infra import fs
  from jlora.run import rundir
  monkeypatch.setattr(fs, "is_url", lambda p: True)
  path = str(tmp_path / "metrics.jsonl")
  out = fs.Appender(path)
  out.write('{"step": 1}\n')
  out.write('{"step": 2}\n')
  out.close()
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
  assert fs.Appender(path)._text.count("step") == 2  # a reopened log keeps its rows
  lock = rundir.Lock(str(tmp_path))
  holder = rundir.Lock.holder(str(tmp_path))
  assert holder and f"process {os.getpid()}" in holder
  lock.release()
  assert rundir.Lock.holder(str(tmp_path)) is None and not (tmp_path / ".lock").exists()
  (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "time": 0}))  # a crashed run's
  assert rundir.Lock.holder(str(tmp_path)) is None
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_start_that_saved_no_step_does_not_block_a_plain_rerun(trained_run, model_dir, tmp_path,
                                                                   capsys, monkeypatch):
  from jlora.run import checkpoint
  real = checkpoint.shutil.disk_usage
  for name, again in (("resumed", ["--resume"]), ("rerun", [])):
    run = tmp_path / name
    toml = write_toml(tmp_path / f"{name}.toml", recipe(model_dir, run))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    assert cli.main(["train", toml, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("training stopped, no step was saved (free space, then run the same "
                        "command again)\n") and err.count("\n") == 1, err
    assert {"config.json", "metrics.jsonl", "tb", ".lock"} <= set(os.listdir(run))
    monkeypatch.undo()
    assert cli.main(["train", toml, "--no-progress", *again]) == 0  # a plain rerun works
    if again:
      assert "has no checkpoint yet: starting from step 0" in capsys.readouterr().out
    assert steps_logged(run) == list(range(9))  # the failed start's rows are gone
    assert len(os.listdir(run / "tb")) == 1  # and its TensorBoard events
    assert_same_adapters(run, trained_run[0])
