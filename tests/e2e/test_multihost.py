"""Several processes, one run, from the CLI: two local ``jlora train`` / ``jlora rl``
processes with 2 fake CPU devices each (gloo, a coordinator on 127.0.0.1) against one
process with 4 devices; one run directory written once; resume after both are killed; a
process killed alone; a config error on both; a sharded step across two processes."""

import json
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from safetensors.numpy import load_file

from jlora.infra import mesh as mesh_lib
from tests.helpers import (
  ROOT,
  recipe,
  run_steps,
  worker_env,
  write_toml,
)

pytestmark = pytest.mark.slow


STALE_S = 5  # JLORA_STALE_S: how soon a silent process counts as gone


def _launch(toml: str, processes: int, *args, command="train", worker=None, env=None):
  """Start ``processes`` jlora processes of one run (each with 4 / processes CPU devices);
  ``worker``: {process id: (mode, n)} runs that one through tests.train_worker."""
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(processes):
    e = {**worker_env(), "JAX_PLATFORMS": "cpu", "JLORA_STALE_S": str(STALE_S),
         "JLORA_WORKER_COMMAND": command, **(env or {})}
    if processes > 1:
      e.update(JLORA_COORDINATOR=f"127.0.0.1:{port}", JLORA_NUM_PROCESSES=str(processes),
               JLORA_PROCESS_ID=str(i))
    extra = ["--cpu-devices", str(4 // processes), *args]
    mode, n = (worker or {}).get(i, ("none", 0))
    cmd = ([sys.executable, "-m", "tests.train_worker", toml, mode, str(n), *extra] if worker
           else [sys.executable, "-m", "jlora.cli", command, toml, "--no-progress", *extra])
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _wait(procs, timeout=600):
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _jlora_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("jlora:")]


def _rows(run_dir) -> list[dict]:
  return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_adapters(a_dir, b_dir, atol):
  a, b = load_file(a_dir / "adapters.safetensors"), load_file(b_dir / "adapters.safetensors")
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)
  assert any(np.abs(v).max() > 1e-3 for k, v in a.items() if k.endswith("/b"))  # it trained


@pytest.fixture(scope="module")
def sft_runs(model_dir, tmp_path_factory):
  """One process x 4 devices and two processes x 2 devices, the same recipe."""
  tmp = tmp_path_factory.mktemp("sft")
  results = {}
  for name, processes in (("one", 1), ("two", 2)):
    toml = write_toml(tmp / f"{name}.toml", recipe(model_dir, tmp / name))
    results[name] = _wait(_launch(toml, processes))
    for rc, _, err in results[name]:
      assert rc == 0, err[-3000:]
  return tmp, results


def test_two_processes_train_like_one_process_with_the_same_devices(sft_runs):
  tmp, _ = sft_runs
  _assert_same_adapters(tmp / "one", tmp / "two", atol=1e-5)
  one, two = _rows(tmp / "one"), _rows(tmp / "two")
  assert [r["step"] for r in two] == list(range(9))  # written once: one row per step
  np.testing.assert_allclose([r.get("loss", 0) for r in two], [r.get("loss", 0) for r in one],
                             rtol=1e-5)
  lines = (tmp / "two" / "metrics.csv").read_text().splitlines()
  assert len(lines) == 10 and lines[0].startswith("step,")
  assert json.loads((tmp / "two" / "summary.json").read_text())["steps"] == 8
  assert sorted(p.name for p in (tmp / "two" / "checkpoints").iterdir()) == ["6", "8"]


def test_resume_after_both_processes_are_killed_is_exact(sft_runs, model_dir):
  tmp, _ = sft_runs
  toml = write_toml(tmp / "kill.toml", recipe(model_dir, tmp / "kill"))
  # global_batch calls: 2 held-out batches, then one per step: call 7 is step 5's batch,
  # after the step-4 checkpoint. Each process kills itself there.
  killed = _wait(_launch(toml, 2, worker={0: ("step", 7), 1: ("step", 7)}))
  assert all(rc != 0 for rc, _, _ in killed), [e[-1500:] for _, _, e in killed]
  assert not (tmp / "kill" / "adapters.safetensors").exists()
  resumed = _wait(_launch(toml, 2, "--resume"))
  for rc, out, err in resumed:
    assert rc == 0, err[-3000:]
    assert "resumed" in out + err
  _assert_same_adapters(tmp / "two", tmp / "kill", atol=0)
  assert [r["step"] for r in _rows(tmp / "kill")] == list(range(9))
  assert [r.get("loss") for r in _rows(tmp / "kill")] == [r.get("loss") for r in _rows(tmp / "two")]


def test_a_process_killed_alone_stops_the_other_with_one_line(sft_runs, model_dir):
  tmp, _ = sft_runs
  toml = write_toml(tmp / "alone.toml", recipe(model_dir, tmp / "alone", steps=200))
  start = time.monotonic()
  (rc0, _, err0), (rc1, _, _) = _wait(_launch(toml, 2, worker={1: ("step", 6)}), timeout=300)
  assert rc1 == -9
  assert rc0 == 1, err0[-3000:]
  assert _jlora_lines(err0) == [
      f"jlora: process 1 of 2 stopped responding (no sign of life for {STALE_S} s); "
      "stopping process 0 of 2"], err0[-3000:]
  assert "Traceback" not in err0
  assert time.monotonic() - start < 240


def test_a_config_error_is_one_line_on_every_process(sft_runs, model_dir):
  tmp, _ = sft_runs
  toml = write_toml(tmp / "bad.toml", recipe(model_dir, tmp / "bad"))
  results = _wait(_launch(toml, 2, "--set", "data.batch_size=6"), timeout=300)
  for rc, _, err in results:
    assert rc == 2, err[-3000:]
    lines = _jlora_lines(err)
    assert len(lines) == 1 and "data.batch_size=6 is not divisible by the mesh's data x " \
        "fsdp = 4 shards" in lines[0], err[-3000:]
    assert "Traceback" not in err
  assert not (tmp / "bad").exists()


def test_jlora_rl_with_two_processes_is_one_process(model_dir, tmp_path):
  from tests.helpers import rl_recipe
  for name, processes in (("one", 1), ("two", 2)):
    toml = write_toml(tmp_path / f"{name}.toml",
                      rl_recipe(model_dir, tmp_path / name, prompts_per_step=4))
    for rc, _, err in _wait(_launch(toml, processes, command="rl")):
      assert rc == 0, err[-3000:]
  _assert_same_adapters(tmp_path / "one", tmp_path / "two", atol=1e-5)
  one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
  assert [r["step"] for r in two] == list(range(7))
  assert [r.get("reward_mean") for r in two] == [r.get("reward_mean") for r in one]


def test_sigterm_on_one_process_stops_both_at_the_same_saved_step(sft_runs, model_dir):
  """A preemption notice reaching one host: every process stops at the next logged step,
  one checkpoint is saved there, and all exit 0."""
  tmp, _ = sft_runs
  toml = write_toml(tmp / "term.toml", recipe(model_dir, tmp / "term", steps=40))
  results = _wait(_launch(toml, 2, worker={0: ("sigterm", 5), 1: ("none", 0)}))
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  steps = [line for _, _, err in results for line in _jlora_lines(err)]
  assert len(steps) == 2 and len({s.split("saved step ")[1].split()[0] for s in steps}) == 1, steps
  saved = sorted(int(p.name) for p in (tmp / "term" / "checkpoints").iterdir())
  assert saved and saved[-1] < 40 and f"saved step {saved[-1]} " in steps[0]


def test_two_processes_match_one_process(tmp_path):
  """2 local processes x 2 devices (gloo) train 5 steps like one process on 4 devices."""
  port = portpicker.pick_unused_port()
  outs = [tmp_path / f"p{i}.json" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(i),
                             str(port), str(outs[i]), "5"], env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0].decode()[-2000:] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), logs
  results = [json.load(open(o)) for o in outs]
  assert results[0]["devices"] == 4 and results[0]["local_devices"] == 2
  reference, _, _ = run_steps(mesh_lib.make_mesh(mesh_lib.MeshConfig(data=-1), jax.devices()[:4]), steps=5)
  for r in results:
    np.testing.assert_allclose(r["losses"], reference["loss"], rtol=1e-5, atol=1e-5)
