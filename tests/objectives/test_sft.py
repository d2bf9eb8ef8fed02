"""jlora.objectives.sft: the full fine-tuning twin trains every parameter."""

import jax
import pytest

from jlora.objectives import sft
from jlora.run import config
from tests.helpers import recipe


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


def test_held_out_metrics_every_n_steps_are_those_of_that_steps_weights(model_dir, tmp_path):
  """``eval.every``: the held-out loss and the task's greedy accuracy logged at step 2 are
  those of step 2's checkpoint evaluated afresh (not the step before, not the final)."""
  import json
  from jlora.run import trained as trained_lib
  values = recipe(model_dir, tmp_path / "run", steps=4, checkpoint_every=2, keep=3)
  values["eval"] = {**values["eval"], "every": 2}
  sft.run(config.from_dict(values), progress=False, log=lambda _: None)
  rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
          if "eval_loss" in r}
  assert sorted(rows) == [0, 2, 4] and all("accuracy" in r for r in rows.values())
  for step in (2, 4):
    t = trained_lib.load_trained(str(tmp_path / "run"), step)
    found = sft.sft_objective(t.setup).evaluate(t.trainable)
    assert found["eval_loss"] == pytest.approx(rows[step]["eval_loss"], rel=1e-6)
    assert found["accuracy"] == rows[step]["accuracy"]
  assert rows[2]["eval_loss"] != rows[4]["eval_loss"]
