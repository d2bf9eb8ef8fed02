"""jlora.run.parsing: a recipe saved with a byte-order mark reads as without."""

import pytest

from jlora.run import config


def test_a_recipe_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
  text = 'run_dir = "r"\n[data]\nsource = "task:arithmetic"\n[train]\nsteps = 7\n'
  (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + text.encode())
  (tmp_path / "plain.toml").write_text(text)
  bom, plain = (config.load(str(tmp_path / f"{n}.toml")) for n in ("bom", "plain"))
  assert bom == plain and bom.train.steps == 7
  (tmp_path / "bad.toml").write_bytes(b"\xef\xbb\xbf" + b"steps = = 3")
  with pytest.raises(ValueError, match="bad.toml: not valid TOML .*at line 1, column 9"):
    config.load(str(tmp_path / "bad.toml"))
