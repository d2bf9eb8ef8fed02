"""jlora.run.trained: a trained run read back: generation equals the merged model's,
checkpoints hold only the trainable state, a missing checkpoint step is one line."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jlora import cli
from jlora.objectives import sft
from jlora.run import config, trained
from tests.helpers import recipe


def test_missing_checkpoint_step_is_one_line_listing_the_steps(trained_run, tmp_path, capsys):
  run, _ = trained_run
  for command in (["export", run, "--out", str(tmp_path / "x")],
                  ["merge", run, "--out", str(tmp_path / "y")],
                  ["generate", run, "--prompt", "What is 1 plus 1?"]):
    assert cli.main([*command, "--step", "3"]) == 2, command
    err = capsys.readouterr().err
    assert err == f"jlora: error: {run}: no checkpoint at step 3; there are steps 6, 8\n"
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


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
