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
