"""jlora.run.config: the schema's checks and the parser's errors are one clear line."""

import os

import pytest

from jlora.run import config
from tests.helpers import ROOT


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
