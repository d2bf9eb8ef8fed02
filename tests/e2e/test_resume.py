"""Resume is exact: a run killed by SIGKILL (mid-training and mid-checkpoint), SIGTERM or
Ctrl-C continues bit-exact, for SFT, RL and a quantised base (nf4, a GGUF's own blocks;
then merged)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jlora import cli, models
from jlora.core import lora, optim, quant
from jlora.objectives import sft
from jlora.run import config
from jlora.run import trained as trained_lib
from tests.helpers import (
  ROOT,
  jlora_rl,
  recipe,
  rl_recipe,
  write_toml,
)


def _final(run):
  return load_file(os.path.join(run, "adapters.safetensors"))


@pytest.mark.parametrize("fmt,other", [("nf4", "int8"), ("gguf", "nf4")])
def test_quantised_resume_is_bit_exact_and_merge_writes_the_dequantised_base(
    request, tmp_path, capsys, fmt, other):
  path = (request.getfixturevalue("gguf_small") if fmt == "gguf"
          else request.getfixturevalue("quant_models")["llama_tied"])
  values = lambda run, steps: {**recipe(path, run, steps=steps),  # noqa: E731
                               "model": {"path": path, "remat": True, "quantize": fmt}}
  sft.run(config.from_dict(values(tmp_path / "ref", 6)), progress=False, log=lambda _: 0)
  run = tmp_path / "run"
  sft.run(config.from_dict(values(run, 4)), progress=False, log=lambda _: 0)
  sft.run(config.from_dict(values(run, 6)), resume=True, progress=False, log=lambda _: 0)
  want, got = _final(tmp_path / "ref"), _final(run)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The base's storage is part of the run: resuming with another format is refused.
  changed = values(run, 8)
  changed["model"]["quantize"] = other
  assert cli.main(["train", write_toml(tmp_path / "c.toml", changed), "--resume"]) == 2
  assert f'model.quantize: "{fmt}" -> "{other}"' in capsys.readouterr().err
  # jlora merge: the dequantised base plus the adapters, as a plain f32 HF directory.
  trained = trained_lib.load_trained(str(run))
  s = trained.setup
  trained_lib.merge_run(str(run), str(tmp_path / "merged"))
  merged_model, merged, _ = models.load(str(tmp_path / "merged"))
  assert not any(quant.is_quantized(x) for x in lora.flatten(merged).values())
  tokens = jnp.arange(24).reshape(2, 12)
  want = s.model.apply({"params": optim.model_params(trained.trainable, s.frozen, s.plan)},
                       tokens)[0]
  np.testing.assert_allclose(merged_model.apply({"params": merged}, tokens)[0], want,
                             atol=1e-4)
  # --dtype: the same merge in bfloat16 (weights and config.json say so), within bf16's
  # rounding of the float32 merge.
  assert cli.main(["merge", str(run), "--out", str(tmp_path / "bf16"), "--dtype",
                   "bfloat16"]) == 0
  half = load_file(str(tmp_path / "bf16" / "model.safetensors"))
  full = load_file(str(tmp_path / "merged" / "model.safetensors"))
  assert half.keys() == full.keys() and {str(x.dtype) for x in half.values()} == {"bfloat16"}
  for k in full:
    np.testing.assert_allclose(half[k].astype(np.float32), full[k], rtol=2**-8, atol=1e-6)
  saved = json.load(open(tmp_path / "bf16" / "config.json"))
  assert saved.get("torch_dtype", saved.get("dtype")) == "bfloat16"


@pytest.mark.slow
def test_rl_runs_together_are_their_solo_runs_and_resume_bit_exact(model_dir, tmp_path):
  """``jlora rl A B``: two RL runs that differ in rank, LR, seeds and prompts x group,
  sampled in one decode and trained in one step: each run's rewards per step are its solo
  run's and its adapters its solo run's within float noise. Killed (SIGKILL) sampling step
  5, with the step-4 saves done or still in flight (a group's runs save one after
  another), the group resumes from the last step both runs saved (``loop._common_step``)
  to the uninterrupted group's rewards exactly and its adapters within float rounding
  (see the note at the assertion) (each run's prompt position
  and sampling key come back; a run resumed a step ahead of the other would sample in
  other company, other floats)."""
  from jlora.objectives import rl

  def runs(name):
    a = rl_recipe(model_dir, tmp_path / name / "a")
    b = rl_recipe(model_dir, tmp_path / name / "b", group_size=2, prompts_per_step=4)
    b["lora"] = {"rank": 2}
    b["train"] = {**b["train"], "lr": 5e-3, "seed": 3}
    b["data"] = {**b["data"], "seed": 2}
    (tmp_path / name).mkdir()
    return {"a": a, "b": b}, [write_toml(tmp_path / name / f"{n}.toml", v)
                              for n, v in (("a", a), ("b", b))]

  values, ref = runs("ref")
  done = jlora_rl(*ref)
  assert done.returncode == 0, done.stderr[-2000:]
  want = {n: _final_adapters(tmp_path / "ref" / n) for n in "ab"}
  rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa
  for n in "ab":  # each run alone
    rl.run(config.from_dict({**values[n], "run_dir": str(tmp_path / f"solo_{n}")}),
           progress=False, log=lambda _: None)
    got, alone = rows(tmp_path / "ref" / n), rows(tmp_path / f"solo_{n}")
    assert [r.get("reward_mean") for r in got] == [r.get("reward_mean") for r in alone], n
    np.testing.assert_allclose([r.get("loss") or 0 for r in got],
                               [r.get("loss") or 0 for r in alone], atol=1e-6, err_msg=n)
    solo = _final_adapters(tmp_path / f"solo_{n}")
    assert want[n].keys() == solo.keys()
    for k in solo:
      np.testing.assert_allclose(want[n][k], solo[k], rtol=0, atol=1e-4, err_msg=f"{n} {k}")
  assert {k: v.shape for k, v in want["a"].items()} != {k: v.shape for k, v in want["b"].items()}
  assert any(np.abs(v).max() > 0 for k, v in want["b"].items() if k.endswith("/b"))
  # global_batch calls: each run's held-out prompts (2), then 2 per step (the prompts of
  # every run, the training batch): call 11 is step 5's prompts
  _, kill = runs("kill")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "JLORA_WORKER_COMMAND": "rl"}
  killed = subprocess.run([sys.executable, "-m", "tests.train_worker", ",".join(kill), "step",
                           "11"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert not (tmp_path / "kill" / "a" / "adapters.safetensors").exists()
  resumed = jlora_rl(*kill, "--resume")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed" in resumed.stdout + resumed.stderr
  for n in "ab":
    got = _final_adapters(tmp_path / "kill" / n)
    for k in want[n]:
      # Known gap (2026-12-06, numpy 2.4.6, flax 0.12.8, optax 0.2.8): an RL group's
      # first step after a resume differs from the uninterrupted one in the last bits (KL
      # and gradient norm at 1e-7 relative, adapters at ~2e-9), where SFT groups and solo
      # RL runs resume bit-exact; the same samples and rewards (asserted exactly below).
      np.testing.assert_allclose(got[k], want[n][k], rtol=0, atol=1e-7, err_msg=f"{n} {k}")
    assert [r["step"] for r in rows(tmp_path / "kill" / n)] == list(range(7))
    assert [r.get("reward_mean") for r in rows(tmp_path / "kill" / n)] == \
        [r.get("reward_mean") for r in rows(tmp_path / "ref" / n)]


def _final_adapters(run_dir):
  return load_file(os.path.join(run_dir, "adapters.safetensors"))


def _worker(toml, mode, n, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "tests.train_worker", toml, mode, str(n),
                         *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
def test_resume_after_a_sigkill_mid_save_is_bit_exact_and_ctrl_c_saves(model_dir, tmp_path):
  reference = tmp_path / "reference"  # uninterrupted, in a subprocess like the others
  done = _worker(write_toml(tmp_path / "ref.toml", recipe(model_dir, reference)), "none", 0)
  assert done.returncode == 0, done.stderr[-2000:]
  want = _final_adapters(reference)
  # Killed inside the 3rd checkpoint save (step 6), after its files are written, before
  # the commit. SIGINT arrives while step 7 is dispatched (global_batch call 9: 2 held-out
  # batches come first): it finishes, is saved, and the process exits 130 with one line
  # saying so. (A SIGKILL mid-step and a SIGTERM, each resumed: the group tests here and
  # tests/e2e/test_dpo.py, on the same loop.)
  for mode, n in (("save", 3), ("sigint", 9)):
    run = tmp_path / mode
    toml = write_toml(tmp_path / f"{mode}.toml", recipe(model_dir, run))
    stopped = _worker(toml, mode, n)
    assert stopped.returncode == {"sigterm": 0, "sigint": 130}.get(mode, -9), \
        stopped.stderr[-2000:]
    assert not (run / "adapters.safetensors").exists()
    done = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
    if mode == "save":  # the interrupted save left no step 6; steps 2 and 4 are intact
      assert done == [2, 4] and any("tmp" in d for d in os.listdir(run / "checkpoints"))
    if mode.startswith("sig"):
      assert done[-1] == 7 and "Traceback" not in stopped.stderr
      name = mode.upper()
      assert f"jlora: {name}: saved step 7 in {run}; resume with: jlora train {toml} " \
             "--resume" in stopped.stderr.splitlines()
    if mode == "sigint":  # stops like SIGTERM (one handler): its resume is SIGTERM's
      continue
    resumed = subprocess.run([sys.executable, "-m", "jlora.cli", "train", toml, "--resume",
                              "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _final_adapters(run)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{mode}: {k}")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 9)), mode  # no step logged twice or lost


@pytest.mark.slow
def test_a_group_resumes_after_sigterm_bit_exact(model_dir, tmp_path):
  """Two runs trained together (``jlora train A B``), stopped by SIGTERM while dispatching
  step 5 (both save step 5, one line prints the group's resume command), resume each from
  its own checkpoint to the bits of an uninterrupted group. (A SIGKILL mid-save, which
  resumes the runs from the last step both saved: the RL group test above.)"""
  def group(name):
    runs = {"a": recipe(model_dir, tmp_path / name / "a"),
            "b": recipe(model_dir, tmp_path / name / "b", lr=1e-2, seed=3)}
    runs["b"]["lora"] = {"rank": 2, "targets": "attn"}
    (tmp_path / name).mkdir()
    return [write_toml(tmp_path / name / f"{n}.toml", v) for n, v in runs.items()]
  done = _worker(",".join(group("ref")), "none", 0)
  assert done.returncode == 0, done.stderr[-2000:]
  want = {n: _final_adapters(tmp_path / "ref" / n) for n in "ab"}
  # global_batch calls: each run's 2 held-out batches (4), then one per step: 9 is step 5's
  mode = "sigterm"
  tomls = group(mode)
  stopped = _worker(",".join(tomls), mode, 9)
  assert stopped.returncode == 0, stopped.stderr[-2000:]
  for n in "ab":
    saved = sorted(int(d) for d in os.listdir(tmp_path / mode / n / "checkpoints")
                   if d.isdigit())
    assert saved[-1] == 5, (mode, n, saved)
  run_a, run_b = tmp_path / mode / "a", tmp_path / mode / "b"
  assert (f"jlora: SIGTERM: saved step 5 in {run_a}; saved step 5 in {run_b}; resume "
          f"with: jlora train {tomls[0]} {tomls[1]} --resume") in stopped.stderr
  resumed = subprocess.run([sys.executable, "-m", "jlora.cli", "train", *tomls, "--resume",
                            "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  for n in "ab":
    got = _final_adapters(tmp_path / mode / n)
    assert got.keys() == want[n].keys()
    for k in want[n]:
      np.testing.assert_array_equal(got[k], want[n][k], err_msg=f"{mode} {n}: {k}")
    rows = (tmp_path / mode / n / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rows] == list(range(9))
