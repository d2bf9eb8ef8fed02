"""jlora.run.checkpoint: a checkpoint without room stops the run there and resume is exact; a
full disk is one line and leaves nothing partial."""

import os
import subprocess
import sys

from jlora import cli
from tests.helpers import ROOT, assert_same_adapters, jlora_cli, recipe, steps_logged, write_toml


def test_a_checkpoint_without_room_stops_the_run_there_and_resume_is_exact(
    trained_run, model_dir, tmp_path, capsys, monkeypatch):
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
  assert steps_logged(run) == [0, 1, 2, 3]  # step 4 was not logged: it was not saved
  monkeypatch.undo()
  assert cli.main(["train", toml, "--resume", "--no-progress"]) == 0
  assert steps_logged(run) == list(range(9))
  assert_same_adapters(run, trained_run[0])  # as the run that never stopped


def test_a_full_disk_is_one_line_and_leaves_nothing_partial(small_disk, trained_run, model_dir,
                                                             tmp_path):
  """On a real full disk (a 4 MiB tmpfs): training refused the checkpoint that does not
  fit, a write that fails after the check (the disk filled meanwhile) stops the run all the
  same, and export / merge leave no partial output; each is one line on stderr, exit 2."""
  run = small_disk.path / "run"
  toml = write_toml(tmp_path / "r.toml", recipe(model_dir, run))
  small_disk.fill(free_kib=700)  # checkpoint 2 (~0.3-0.4 MiB on tmpfs) fits, 4 fails the check
  out = jlora_cli("train", toml, "--no-progress")
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert out.stderr.startswith(f"jlora: error: checkpoint step 4 could not be saved in {run}/"
                               "checkpoints: no space left on device (") and\
      "the last good checkpoint is step 2" in out.stderr, out.stderr
  assert os.listdir(run / "checkpoints") == ["2"]  # (its resume: the test above)

  # The disk fills while orbax writes (the space check passed): orbax's writer threads give
  # up, the loop finds out at its next poll, and their tracebacks are not shown. The disk is
  # filled from inside the run, right after step 4's space check, to 64 KiB left: a checkpoint
  # takes 0.3-0.4 MiB on tmpfs, but how many files orbax writes varies from run to run, so a
  # fill made before the run could not promise that checkpoint 2 fits and 4 does not.
  small_disk.empty()
  again = small_disk.path / "again"
  toml = write_toml(tmp_path / "again.toml", recipe(model_dir, again))
  script = ("import collections, pathlib, sys; from jlora import cli; "
            "from jlora.run import checkpoint; from tests.small_disk import SmallDisk; "
            "U = collections.namedtuple('U', 'total used free'); checks = []\n"
            "def usage(path):\n"
            "  checks.append(path)\n"
            "  if len(checks) == 2:\n"
            f"    SmallDisk(pathlib.Path({str(small_disk.path)!r})).fill(free_kib=64)\n"
            "  return U(1 << 40, 0, 1 << 40)\n"
            "checkpoint.shutil.disk_usage = usage\n"
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
  for command in (["export", trained_run[0], "--out", str(small_disk.path / "peft")],
                  ["merge", trained_run[0], "--out", str(small_disk.path / "merged")]):
    out = jlora_cli(*command)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"cannot write {command[-1]} (nothing was written): no space left on device" in\
        out.stderr, out.stderr
    assert small_disk.files() == before  # no partial directory, no temporary one
