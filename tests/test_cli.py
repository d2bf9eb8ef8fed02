"""jlora.cli: bad input is one line and exit code 2."""

import pytest

from jlora import cli


def test_bad_rank_is_one_line_and_exit_2(capsys):
  assert cli.main(["demo", "--rank", "300", "--steps", "1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jlora: error: LoRA rank 300 exceeds") and "\n" not in err


def test_argparse_errors_exit_2():
  with pytest.raises(SystemExit) as e:
    cli.main(["demo", "--steps", "0"])
  assert e.value.code == 2
