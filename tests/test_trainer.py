"""The trainer: configs, a tiny end-to-end run, exact resume after SIGKILL (mid-training
and mid-checkpoint), trainable-only checkpoints, generation, and bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jlora import cli
from jlora.objectives import sft
from jlora.run import config, loop, trained
from tests.helpers import tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny_model_dir(str(tmp_path_factory.mktemp("model")))


def recipe(model_dir, run_dir, **train):
  return {"run_dir": str(run_dir), "model": {"path": model_dir, "remat": False},
          "lora": {"rank": 4},
          "train": {"steps": 8, "checkpoint_every": 2, "lr": 3e-3, "keep": 2, **train},
          "data": {"source": "task:arithmetic", "size": 200, "seq_len": 64, "batch_size": 8},
          "eval": {"examples": 4, "batches": 2, "max_new_tokens": 3}}


def write_toml(path, values):
  def fmt(v):
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
  lines = [f"run_dir = {fmt(values['run_dir'])}"]
  for section in [k for k, v in values.items() if isinstance(v, dict)]:
    lines.append(f"[{section}]")
    lines += [f"{k} = {fmt(v)}" for k, v in values[section].items()]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_config_errors_are_one_clear_line():
  base = {"run_dir": "r", "data": {"source": "task:arithmetic"}}
  with pytest.raises(ValueError, match=r"unknown config key 'train.stpes' \(did you mean "
                                       r"'train.steps'\?\)"):
    config.from_dict({**base, "train": {"stpes": 3}})
  with pytest.raises(ValueError, match="data.seq_len: expected an integer"):
    config.from_dict({**base, "data": {"source": "x", "seq_len": "long"}})
  with pytest.raises(ValueError, match="train.schedule 'cosin'"):
    config.from_dict(base, ["train.schedule=cosin"])
  with pytest.raises(ValueError, match="train.grad_clip must be >= 0"):
    config.from_dict(base, ["train.grad_clip=-1.0"])
  with pytest.raises(ValueError, match="model.lora_impl 'fused' is not one of"):
    config.from_dict(base, ["model.lora_impl=fused"])
  with pytest.raises(ValueError, match="missing 'run_dir'"):
    config.from_dict({"data": {"source": "x"}})
  with pytest.raises(ValueError, match="model.quantize_embeddings 'nf4' needs a quantised "
                                       "base"):
    config.from_dict(base, ["model.quantize_embeddings=nf4"])
  assert config.from_dict(base, ["model.quantize=nf4", "model.quantize_embeddings=nf4"]
                          ).model.quantize_embeddings == "nf4"
  cfg = config.from_dict(base, ["train.steps=5", "lora.targets=['mlp']", "train.lr=1e-4"])
  assert (cfg.train.steps, cfg.lora.targets, cfg.train.lr) == (5, ["mlp"], 1e-4)
  for name in ("quickstart", "quickstart_full", "llama3_8b", "qwen3_8b"):
    loaded = config.load(os.path.join(ROOT, "configs", f"{name}.toml"))
    assert loaded.lora.alpha == 32 and loaded.lora.targets == "all"
    assert loaded.data.batch_size <= 256 and loaded.train.schedule == "constant"


def test_a_recipe_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
  text = 'run_dir = "r"\n[data]\nsource = "task:arithmetic"\n[train]\nsteps = 7\n'
  (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + text.encode())
  (tmp_path / "plain.toml").write_text(text)
  bom, plain = (config.load(str(tmp_path / f"{n}.toml")) for n in ("bom", "plain"))
  assert bom == plain and bom.train.steps == 7
  (tmp_path / "bad.toml").write_bytes(b"\xef\xbb\xbf" + b"steps = = 3")
  with pytest.raises(ValueError, match="bad.toml: not valid TOML .*at line 1, column 9"):
    config.load(str(tmp_path / "bad.toml"))


def test_train_then_generate_and_trainable_only_checkpoints(model_dir, tmp_path):
  cfg = config.from_dict(recipe(model_dir, tmp_path / "run"))
  seen = []
  summary = sft.run(cfg, progress=False, log=lambda _: None, on_row=seen.append)
  run = tmp_path / "run"
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(0, 9))  # step 0: before training
  assert [json.loads(json.dumps(r)) for r in seen] == rows  # on_row: each row as written
  assert rows[0]["eval_loss"] == summary["eval_loss_before"]
  assert rows[0]["accuracy"] == summary["accuracy_before"]
  assert rows[-1]["eval_loss"] == summary["eval_loss_after"]
  assert summary["eval_loss_after"] < summary["eval_loss_before"]
  assert summary["accuracy_examples"] == 4
  assert summary["accuracy_after"] * 4 == round(summary["accuracy_after"] * 4)  # k of 4
  assert (run / "metrics.csv").read_text().count("\n") == 10
  assert os.listdir(run / "tb")
  # Only trainable state is on disk: adapters + Adam moments + the step counter, no base.
  assert summary["optimizer_bytes"] == pytest.approx(2 * summary["trainable_bytes"], rel=0.01)
  assert summary["checkpoint_array_bytes"] == (summary["trainable_bytes"] +
                                               summary["optimizer_bytes"] + 4)
  assert sorted(int(d) for d in os.listdir(run / "checkpoints")) [-2:] == [6, 8]
  adapters = load_file(run / "adapters.safetensors")
  assert adapters and all(k.endswith(("/a", "/b")) for k in adapters)
  # jlora generate (base + adapters, unmerged) == greedy decoding of the merged weights.
  from jlora import models
  from jlora.core import lora
  from jlora.data import render
  model, params, _ = models.load(model_dir)
  spec = models.lora_spec(models.read_config(model_dir), 4)
  tree = lora.unflatten({k: jax.numpy.asarray(v) for k, v in adapters.items()})
  tok = __import__("jlora").data.Tokenizer.from_model(model_dir)
  ids = render.prompt_ids({"prompt": "What is 2 plus 2?"}, tok, chat=True)
  want = models.generate(model, lora.merge(params, tree, spec), jax.numpy.asarray(ids)[None],
                         max_new_tokens=3)
  want_text = tok.decode([int(i) for i in np.asarray(want[0]) if i != tok.eos_id])
  assert trained.generate(str(run), "What is 2 plus 2?", max_new_tokens=3) == want_text


def _final_adapters(run_dir):
  return load_file(os.path.join(run_dir, "adapters.safetensors"))


def _worker(toml, mode, n, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "tests.train_worker", toml, mode, str(n),
                         *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
def test_resume_after_sigkill_sigterm_and_ctrl_c_is_bit_exact(model_dir, tmp_path):
  reference = tmp_path / "reference"  # uninterrupted, in a subprocess like the others
  done = _worker(write_toml(tmp_path / "ref.toml", recipe(model_dir, reference)), "none", 0)
  assert done.returncode == 0, done.stderr[-2000:]
  want = _final_adapters(reference)
  # Killed dispatching step 7 (global_batch call 9: 2 held-out batches come first), and
  # inside the 3rd checkpoint save (step 6), after its files are written, before the commit.
  # SIGTERM / SIGINT arrive while step 7 is dispatched: it finishes, is saved, and the
  # process exits 0 / 130 with one line saying so.
  for mode, n in (("step", 9), ("save", 3), ("sigterm", 9), ("sigint", 9)):
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


def test_bad_input_exits_2_without_touching_runs(model_dir, tmp_path, capsys):
  good = recipe(model_dir, tmp_path / "run")
  toml = write_toml(tmp_path / "bad_key.toml", {**good, "train": {"stpes": 3}})
  assert cli.main(["train", toml]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "did you mean 'train.steps'" in err
  assert cli.main(["train", write_toml(tmp_path / "g.toml", good), "--set",
                   "model.path=/no/such/model"]) == 2
  assert "/no/such/model" in capsys.readouterr().err
  assert cli.main(["train", str(tmp_path / "missing.toml")]) == 2
  assert "no such config file" in capsys.readouterr().err
  if jax.default_backend() == "cpu":  # compiled kernels need a TPU or GPU: refused up front
    toml = write_toml(tmp_path / "k.toml", {**good, "run_dir": str(tmp_path / "k_run")})
    assert cli.main(["train", toml, "--set", "model.lora_impl=pallas"]) == 2
    assert "needs a TPU or GPU" in capsys.readouterr().err
    assert not (tmp_path / "k_run").exists()
  blocker = tmp_path / "a_file"  # a run dir under a regular file cannot be created (as root too)
  blocker.write_text("")
  toml = write_toml(tmp_path / "l.toml", {**good, "run_dir": str(blocker / "run")})
  assert cli.main(["train", toml]) == 2
  assert "cannot write the run directory" in capsys.readouterr().err
  # An existing run is never overwritten, and resume refuses a changed spec.
  existing = tmp_path / "existing"
  (existing / "checkpoints" / "2").mkdir(parents=True)  # a step was saved: a run to keep
  (existing / "config.json").write_text(config.from_dict(recipe(model_dir, existing)).to_json())
  toml = write_toml(tmp_path / "e.toml", recipe(model_dir, existing))
  assert cli.main(["train", toml]) == 2
  assert "already holds a run" in capsys.readouterr().err
  assert cli.main(["train", toml, "--resume", "--set", "lora.rank=8"]) == 2
  assert "changed since it started: lora.rank: 4 -> 8" in capsys.readouterr().err
  assert json.loads((existing / "config.json").read_text())["lora"]["rank"] == 4


def test_chunked_loss_equals_full_logits_loss(model_dir):
  from jlora import models
  from jlora.objectives import lm
  model, params, _ = models.load(model_dir)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 300, (2, 24)), "targets": rng.integers(0, 300, (2, 24)),
           "mask": rng.integers(0, 2, (2, 24))}
  full = jax.value_and_grad(lambda p: lm.token_loss_sum(model, p, batch)[0])(params)
  chunked = jax.value_and_grad(lambda p: lm.token_loss_sum(model, p, batch, 7)[0])(params)
  np.testing.assert_allclose(full[0], chunked[0], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(full[1]), jax.tree_util.tree_leaves(chunked[1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_schedules():
  from jlora.core import optim
  s = optim.schedule(1.0, 10, "linear", warmup_steps=2)
  assert [round(float(s(i)), 3) for i in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
  assert optim.schedule(0.1, 100) == 0.1
  cos = optim.schedule(1.0, 10, "cosine")
  assert float(cos(0)) == 1.0 and float(cos(10)) == pytest.approx(0.0, abs=1e-6)
  assert float(cos(5)) == pytest.approx(0.5, abs=1e-6)  # (1 + cos(pi/2)) / 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(model_dir, tmp_path):
  cfg = config.from_dict(recipe(model_dir, tmp_path / "run", lr=1e30, grad_clip=None,
                                steps=12))
  with pytest.raises(loop.NonFiniteLoss, match="non-finite at step") as info:
    sft.run(cfg, progress=False, log=lambda _: None)
  message = str(info.value)
  bad = int(message.split("non-finite at step ")[1].split(" ")[0])
  kept = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert all(k < bad for k in kept)
  assert (f"step {kept[-1]}" if kept else "none") in message.split("last good checkpoint")[1]
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 0 and "loss" not in rows[0]  # held-out metrics before training
  assert all(np.isfinite(r["loss"]) for r in rows[1:]) and all(r["step"] < bad for r in rows)


def test_full_fine_tuning_twin_trains_every_parameter(model_dir, tmp_path):
  cfg = config.from_dict(recipe(model_dir, tmp_path / "full", method="full", steps=4,
                                lr=1e-3))
  summary = sft.run(cfg, progress=False, log=lambda _: None)
  _, params, _ = __import__("jlora").models.load(model_dir)
  base = sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))
  assert summary["trainable_bytes"] == base
  assert summary["checkpoint_array_bytes"] == pytest.approx(3 * base, rel=0.01)
  assert summary["eval_loss_after"] < summary["eval_loss_before"]
  assert not (tmp_path / "full" / "adapters.safetensors").exists()
