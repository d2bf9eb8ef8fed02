"""Run directories as a user meets them: one trainer per directory (two real processes),
everything validated before a directory is created, data with nothing to train on,
checkpoint steps that do not exist, resuming a finished run, and what is printed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jlora import cli
from jlora.run import config
from tests.test_trainer import ROOT, model_dir, recipe, write_toml  # noqa: F401 (fixture)


def _jlora(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "jlora.cli", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _snapshot(run_dir):
  """{relative path: (size, mtime_ns)} of every file in a run directory."""
  out = {}
  for root, _, files in os.walk(run_dir):
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.relpath(os.path.join(root, f), run_dir)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
  """A finished 8-step run (checkpoints kept: 6 and 8) and its config file."""
  tmp = tmp_path_factory.mktemp("trained")
  toml = write_toml(tmp / "run.toml", recipe(model_dir, tmp / "run"))
  assert cli.main(["train", toml, "--no-progress"]) == 0
  return str(tmp / "run"), toml


def test_missing_checkpoint_step_is_one_line_listing_the_steps(trained, tmp_path, capsys):
  run, _ = trained
  for command in (["export", run, "--out", str(tmp_path / "x")],
                  ["merge", run, "--out", str(tmp_path / "y")],
                  ["generate", run, "--prompt", "What is 1 plus 1?"]):
    assert cli.main([*command, "--step", "3"]) == 2, command
    err = capsys.readouterr().err
    assert err == f"jlora: error: {run}: no checkpoint at step 3; there are steps 6, 8\n"
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_resuming_a_finished_run_changes_nothing(trained, capsys):
  run, toml = trained
  before = _snapshot(run)
  summary = json.load(open(os.path.join(run, "summary.json")))
  assert cli.main(["train", toml, "--resume", "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert f"{run} already finished at step 8 (train.steps = 8): nothing to do" in out
  assert _snapshot(run) == before  # not one file rewritten, no new event file
  assert json.load(open(os.path.join(run, "summary.json"))) == summary


def test_what_a_user_sees(model_dir, tmp_path, capsys):
  assert _jlora("--version").stdout.strip() == f"jlora {__import__('jlora').__version__}"
  lines, seen = [], []
  from jlora.objectives import sft
  from jlora.run import events
  cfg = config.from_dict(recipe(model_dir, tmp_path / "run", steps=2, checkpoint_every=2))
  sft.run(cfg, progress=False, log=lines.append, on_event=seen.append)
  text = "\n".join(lines)
  # Loading and the first evaluation announce themselves before the silence they cause.
  order = [text.index(s) for s in ("loading llama", "loaded in", "evaluating before training",
                                   "before training: eval_loss")]
  assert order == sorted(order), text
  # What a program subscribes to: every phase once and in order, rows 0..2, a checkpoint
  # before the final row, all on one monotonic clock.
  assert [e.name for e in seen if e.kind == "phase"] == list(events.PHASES)
  assert [e.step for e in seen if e.kind == "row"] == [0, 1, 2]
  names = [e.name if e.kind == "phase" else f"{e.kind} {e.step}" for e in seen]
  assert names.index("checkpoint 2") < names.index("row 2") < names.index("finish")
  assert [e.time for e in seen] == sorted(e.time for e in seen)
  log = tmp_path / "events.jsonl"  # and through the CLI, as a file another process reads
  toml = write_toml(tmp_path / "r.toml", recipe(model_dir, tmp_path / "cli", steps=2))
  assert cli.main(["train", toml, "--no-progress", "--events", str(log)]) == 0
  assert [e.name for e in events.read(str(log)) if e.kind == "phase"] == list(events.PHASES)


@pytest.mark.parametrize("override,message", [
    ("model.path='/no/such/model'", "/no/such/model"),
    ("eval.source='/no/such/held_out.jsonl'", "/no/such/held_out.jsonl"),
    ("lora.init='/no/such/adapter'", "/no/such/adapter"),
    ("mesh.data=3", "mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are available"),
    ("train.grad_accum=3", "data.batch_size=8 is not divisible by train.grad_accum=3"),
    ("train.lr=inf", "train.lr must be a finite number > 0, got inf"),
    ("data.seq_len=100000", "data.seq_len=100000 exceeds the model's maximum positions (256)"),
])
def test_everything_knowable_is_checked_before_the_run_dir_exists(model_dir, tmp_path, capsys,
                                                                 override, message):
  run = tmp_path / "run"
  toml = write_toml(tmp_path / "r.toml", recipe(model_dir, run))
  assert cli.main(["train", toml, "--set", override]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err
  assert not run.exists()  # so a corrected rerun (or --resume) is not blocked by it


def test_data_with_nothing_to_train_on_is_an_error(model_dir, tmp_path, capsys):
  data = tmp_path / "long_prompts.jsonl"
  with open(data, "w") as f:
    for i in range(20):
      f.write(json.dumps({"prompt": "x " * 80 + str(i), "completion": "done"}) + "\n")
  values = recipe(model_dir, tmp_path / "run")
  values["data"] = {"source": str(data), "seq_len": 32, "batch_size": 8}
  values["eval"] = {"batches": 0, "examples": 0}
  assert cli.main(["train", write_toml(tmp_path / "r.toml", values)]) == 2
  err = capsys.readouterr().err
  assert (f"data.source '{data}' has no trainable tokens: 20 examples, 640 tokens, 0 with "
          "loss (20 truncated at data.seq_len=32") in err
  assert not (tmp_path / "run").exists()


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
      second = _jlora("train", toml, "--no-progress", *extra)
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
  again = _jlora("train", toml, "--no-progress", "--set", "train.steps=2")
  assert again.returncode == 0, again.stderr[-2000:]
  assert _steps_logged(run) == [0, 1, 2]


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


# --- storage failures: a full disk ------------------------------------------------------------

def _steps_logged(run):
  return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_adapters(run, reference):
  from safetensors.numpy import load_file
  got, want = load_file(run / "adapters.safetensors"), load_file(
      os.path.join(reference, "adapters.safetensors"))
  assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def test_a_checkpoint_without_room_stops_the_run_there_and_resume_is_exact(
    trained, model_dir, tmp_path, capsys, monkeypatch):
  """The free space orbax would need is checked before it writes (the disk's answer is
  replaced here; the tmpfs test below fills a real one): the run stops at that step with
  one line naming the last good checkpoint, and continues exactly once there is room."""
  from jlora.run import checkpoint
  real, calls = checkpoint.shutil.disk_usage, []

  def usage(path):  # room for checkpoint 2, none from checkpoint 4 on
    calls.append(path)
    return real(path) if len(calls) == 1 else real(path)._replace(free=4096)

  monkeypatch.setattr(checkpoint.shutil, "disk_usage", usage)
  run = tmp_path / "run"
  toml = write_toml(tmp_path / "r.toml", recipe(model_dir, run))
  assert cli.main(["train", toml, "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err == (f"jlora: error: checkpoint step 4 could not be saved in {run}/checkpoints: "
                 "no space left on device (0.0 MiB free, the checkpoint needs ~0.5 MiB); "
                 "training stopped, the last good checkpoint is step 2 (free space, then "
                 f"resume); resume with: jlora train {toml} --resume\n"), err
  assert checkpoint.steps(str(run)) == [2] and os.listdir(run / "checkpoints") == ["2"]
  assert _steps_logged(run) == [0, 1, 2, 3]  # step 4 was not logged: it was not saved
  monkeypatch.undo()
  assert cli.main(["train", toml, "--resume", "--no-progress"]) == 0
  assert _steps_logged(run) == list(range(9))
  _same_adapters(run, trained[0])  # as the run that never stopped


def test_a_start_that_saved_no_step_does_not_block_a_plain_rerun(trained, model_dir, tmp_path,
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
    assert _steps_logged(run) == list(range(9))  # the failed start's rows are gone
    assert len(os.listdir(run / "tb")) == 1  # and its TensorBoard events
    _same_adapters(run, trained[0])


def test_a_full_disk_is_one_line_and_leaves_nothing_partial(small_disk, trained, model_dir,
                                                             tmp_path):
  """On a real full disk (a 4 MiB tmpfs): training refused the checkpoint that does not
  fit, a write that fails after the check (the disk filled meanwhile) stops the run all the
  same, and export / merge leave no partial output; each is one line on stderr, exit 2."""
  run = small_disk.path / "run"
  toml = write_toml(tmp_path / "r.toml", recipe(model_dir, run))
  small_disk.fill(free_kib=700)  # checkpoint 2 (~250 KiB on tmpfs) fits, 4 does not
  out = _jlora("train", toml, "--no-progress")
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert out.stderr.startswith(f"jlora: error: checkpoint step 4 could not be saved in {run}/"
                               "checkpoints: no space left on device (") and \
      "the last good checkpoint is step 2" in out.stderr, out.stderr
  assert os.listdir(run / "checkpoints") == ["2"]
  small_disk.empty()
  assert _jlora("train", toml, "--no-progress", "--resume").returncode == 0
  assert _steps_logged(run) == list(range(9))  # (exactness: the test above, in-process)

  # The disk fills while orbax writes (the space check passed): orbax's writer threads give
  # up, the loop finds out at its next poll, and their tracebacks are not shown.
  again = small_disk.path / "again"
  toml = write_toml(tmp_path / "again.toml", recipe(model_dir, again))
  small_disk.fill(free_kib=420)  # checkpoint 2 fits, 4 fails while it is written
  script = ("import collections, sys; from jlora import cli; from jlora.run import checkpoint; "
            "U = collections.namedtuple('U', 'total used free'); "
            "checkpoint.shutil.disk_usage = lambda p: U(1 << 40, 0, 1 << 40); "
            f"sys.exit(cli.main(['train', {toml!r}, '--no-progress']))")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert out.stderr.startswith(f"jlora: error: checkpoint step 4 could not be saved in "
                               f"{again}/checkpoints: no space left on device; training "
                               "stopped, the last good checkpoint is step 2"), out.stderr
  from jlora.run import checkpoint
  assert checkpoint.steps(str(again)) == [2]

  small_disk.fill(free_kib=8)
  before = small_disk.files()
  for command in (["export", trained[0], "--out", str(small_disk.path / "peft")],
                  ["merge", trained[0], "--out", str(small_disk.path / "merged")]):
    out = _jlora(*command)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"cannot write {command[-1]} (nothing was written): no space left on device" in \
        out.stderr, out.stderr
    assert small_disk.files() == before  # no partial directory, no temporary one
