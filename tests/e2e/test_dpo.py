"""``jlora dpo`` end to end on a tiny model: two runs trained together (one with
train.grad_accum = 2, one from a lora.init adapter) resume bit-exact after a
SIGKILL; a run alone stopped by SIGTERM saves, resumes and ends where its group's twin
ends; its adapters export as PEFT; bad [dpo] values and records missing a field are one
line before anything is created; a changed [dpo] is refused on resume."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jlora import cli, models
from jlora.core import lora
from jlora.interop import peft
from jlora.run import config, rundir
from tests.helpers import ROOT, randomize_b, write_jsonl, write_toml


def _recipe(model_dir, run_dir, **train):
  return {"run_dir": str(run_dir), "model": {"path": model_dir, "remat": False},
          "lora": {"rank": 4},
          "train": {"steps": 8, "checkpoint_every": 2, "lr": 3e-3, "keep": 2, **train},
          "data": {"source": "task:arithmetic_pairs", "size": 64, "seq_len": 64,
                   "batch_size": 4},
          "eval": {"examples": 0, "batches": 1},  # greedy accuracy: SFT's, tested there
          "dpo": {"beta": 0.2}}


def _worker(tomls, mode, n, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "JLORA_WORKER_COMMAND": "dpo"}
  return subprocess.run([sys.executable, "-m", "tests.train_worker", ",".join(tomls), mode,
                         str(n), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)


def _rows(run):
  return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_group_resumes_bit_exact_and_a_run_alone_is_its_group_twin(model_dir, tmp_path):
  _, params, model_cfg = models.load(model_dir)
  spec = models.lora_spec(model_cfg, 2)
  start = randomize_b(lora.init_adapters(params, spec, jax.random.PRNGKey(0)),
                      jax.random.PRNGKey(1), 0.05)
  peft.save_peft(str(tmp_path / "start"), start, spec, model_cfg)

  def group(name):
    a = _recipe(model_dir, tmp_path / name / "a", grad_accum=2)
    b = _recipe(model_dir, tmp_path / name / "b", grad_accum=2, lr=1e-2, seed=3)
    b["lora"] = {"init": str(tmp_path / "start")}
    b["data"] = {**b["data"], "seed": 2}
    (tmp_path / name).mkdir()
    return [write_toml(tmp_path / name / f"{n}.toml", v) for n, v in (("a", a), ("b", b))]

  done = _worker(group("ref"), "none", 0)
  assert done.returncode == 0, done.stderr[-2000:]
  want = {n: load_file(tmp_path / "ref" / n / "adapters.safetensors") for n in "ab"}
  for n in "ab":
    rows = _rows(tmp_path / "ref" / n)
    assert rows[0]["eval_loss"] == np.float32(np.log(2))  # policy = reference at the start
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"]
    assert 0 <= rows[-1]["preference_accuracy"] <= 1 and "rewards/margins" in rows[-2]
  # global_batch calls: each run's held-out batch (2), then one per step: 7 is step 5's
  kill = group("kill")
  killed = _worker(kill, "step", 7)
  assert killed.returncode == -9, killed.stderr[-2000:]
  resumed = _worker(kill, "none", 0, "--resume")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  for n in "ab":
    got = load_file(tmp_path / "kill" / n / "adapters.safetensors")
    assert got.keys() == want[n].keys()
    for k in want[n]:
      np.testing.assert_array_equal(got[k], want[n][k], err_msg=f"{n} {k}")
    assert [r["step"] for r in _rows(tmp_path / "kill" / n)] == list(range(9))
  # Run a alone, stopped by SIGTERM dispatching step 5 (call 1: its held-out batch): it
  # saves step 5, says how to resume, and resumes to its group twin's adapters.
  solo = write_toml(tmp_path / "solo.toml", _recipe(model_dir, tmp_path / "solo",
                                                    grad_accum=2))
  stopped = _worker([solo], "sigterm", 6)
  assert stopped.returncode == 0, stopped.stderr[-2000:]
  assert (f"jlora: SIGTERM: saved step 5 in {tmp_path / 'solo'}; resume with: jlora dpo "
          f"{solo} --resume") in stopped.stderr.splitlines()
  resumed = _worker([solo], "none", 0, "--resume")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  got = load_file(tmp_path / "solo" / "adapters.safetensors")
  for k in want["a"]:
    np.testing.assert_allclose(got[k], want["a"][k], rtol=0, atol=1e-5, err_msg=k)
  assert cli.main(["export", str(tmp_path / "solo"), "--out", str(tmp_path / "peft")]) == 0
  adapter, _, _ = peft.load_peft(str(tmp_path / "peft"), params, model_cfg)
  flat = lora.flatten(adapter)
  assert any(np.abs(np.asarray(v)).max() > 0 for k, v in flat.items() if k.endswith("/b"))


def test_bad_dpo_settings_and_records_are_one_line_errors(model_dir, tmp_path, capsys):
  values = _recipe(model_dir, tmp_path / "run")
  values["dpo"] = {"bta": 0.1}
  assert cli.main(["dpo", write_toml(tmp_path / "a.toml", values)]) == 2
  assert "dpo.bta" in capsys.readouterr().err
  values["dpo"] = {"loss": "kto"}
  assert cli.main(["dpo", write_toml(tmp_path / "b.toml", values)]) == 2
  err = capsys.readouterr().err.strip()
  assert err == ("jlora: error: dpo.loss 'kto' is not one of sigmoid, ipo, hinge, simpo, orpo")
  write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                         {"prompt": "d", "chosen": "e"}])
  values["dpo"] = {}
  values["data"] = {**values["data"], "source": str(tmp_path / "pairs.jsonl"), "size": None}
  del values["data"]["size"]
  assert cli.main(["dpo", write_toml(tmp_path / "c.toml", values)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "record has no field 'rejected'" in err[0] and "pairs.jsonl" in err[0]
  assert not (tmp_path / "run").exists()
  # [dpo] is part of the trajectory: --resume refuses a changed one, naming the key
  values = _recipe(model_dir, tmp_path / "run")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(config.from_dict(values).to_json())
  values["dpo"] = {"beta": 0.3}
  with pytest.raises(ValueError, match=r"changed since it started: dpo.beta: 0.2 -> 0.3$"):
    rundir.check(config.from_dict(values), resume=True)
