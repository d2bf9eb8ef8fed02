"""jlora.objectives.rl.section: ``[rl]``'s defaults (rank 1, alpha 32, the LR rule) and its
one-line errors."""

import os

import pytest

from tests.helpers import ROOT


def test_rl_config_defaults_and_errors():
  from jlora.run import config
  base = {"run_dir": "r", "data": {"source": "task:arithmetic"}}
  cfg = config.from_dict({**base, "rl": {}})
  assert cfg.lora.rank == 1 and cfg.rl.loss == "importance_sampling" and cfg.rl.clip == 0.2
  assert config.from_dict({**base, "rl": {}, "lora": {"rank": 8}}).lora.rank == 8
  assert config.from_dict(base).rl is None and config.from_dict(base).lora.rank == 16
  with pytest.raises(ValueError, match=r"unknown config key 'rl.grup_size' \(did you mean "
                                       r"'rl.group_size'\?\)"):
    config.from_dict({**base, "rl": {"grup_size": 4}})
  with pytest.raises(ValueError, match="rl.loss 'kto' is not one of importance_sampling, "
                                       "ppo, grpo, dr_grpo, dapo, gspo, cispo$"):
    config.from_dict({**base, "rl": {"loss": "kto"}})
  assert config.from_dict({**base, "rl": {"loss": "dapo"}}).rl.clip_high == 0.28
  with pytest.raises(ValueError, match=r"^rl.clip_high must be > 0, got -0.1$"):
    config.from_dict({**base, "rl": {"clip_high": -0.1}})
  with pytest.raises(ValueError, match=r"^rl.gspo_clip_low must be in \(0, 1\), got 2.0$"):
    config.from_dict({**base, "rl": {"gspo_clip_low": 2.0}})
  with pytest.raises(ValueError, match=r"rl.clip must be in \(0, 1\)"):
    config.from_dict({**base, "rl": {"clip": 1.5}})
  with pytest.raises(ValueError, match="rl.group_size must be >= 2, got 1: advantages are "
                                       "rewards minus their group's mean"):
    config.from_dict({**base, "rl": {"group_size": 1}})
  shipped = config.load(os.path.join(ROOT, "configs", "rl_arithmetic.toml"))
  assert shipped.lora.rank == 1 and shipped.lora.alpha == 32 and shipped.train.lr is None
  assert shipped.train.schedule == "constant" and shipped.rl.kl_coef == 0.0
  from jlora.objectives import sft
  with pytest.raises(ValueError, match="has the section \\[rl\\]: run it with jlora rl"):
    sft.run(config.from_dict({**base, "rl": {}}))
