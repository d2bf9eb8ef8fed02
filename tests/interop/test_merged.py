"""jlora.interop.merged: a merged checkpoint's dtype defaults to the base checkpoint's."""

import numpy as np
import pytest

from jlora import cli, models
from jlora.interop import merged
from tests.helpers import tiny_model_dir


def test_merge_dtype_defaults_to_the_base_checkpoints(tmp_path):
  assert merged.base_dtype(tiny_model_dir(str(tmp_path))) == np.float32  # an f32 HF dir
  # SmolLM2's GGUF is Q4_1: no 16-bit form to match, so the merge is written in float32.
  assert merged.base_dtype(models.smollm2_gguf()) == np.float32
  with pytest.raises(SystemExit) as e:  # argparse: exit 2 naming the choices
    cli.main(["merge", str(tmp_path), "--out", str(tmp_path / "m"), "--dtype", "int8"])
  assert e.value.code == 2
