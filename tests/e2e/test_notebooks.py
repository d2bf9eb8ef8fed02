"""The notebooks: what is committed is clean and complete; each runs end to end (small).

The slow tests execute every notebook with CI's small parameters (``notebooks/execute.py``
SMALL) through papermill in a fresh kernel and fail on any cell error; each one's time is
printed at the end of the session (conftest's terminal summary)."""

import ast
import configparser
import os
import re

import nbformat
import pytest

from notebooks import execute
from tests.helpers import ROOT


def _repo_url() -> str:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  return cfg["metadata"]["url"]


def _load(name):
  return nbformat.read(execute.path(name), as_version=4)


def _tagged(nb, tag):
  cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


@pytest.mark.parametrize("name", execute.NAMES)
def test_committed_notebook_is_executed_clean_and_complete(name):
  nb = _load(name)
  nbformat.validate(nb)
  assert execute.errors(nb) == []
  code = [c for c in nb.cells if c.cell_type == "code"]
  counts = [c.execution_count for c in code]
  assert None not in counts, "a code cell was never executed"
  assert counts == sorted(counts), "cells were executed out of order"
  outputs = [o for c in code for o in c.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no plot in the outputs"
  # papermill's parameters cell: the names CI overrides are assigned there
  assigned = {t.id for node in ast.parse(_tagged(nb, "parameters").source).body
              for t in getattr(node, "targets", [])}
  assert set(execute.SMALL[name]) <= assigned
  # a diff-friendly file: no timings or papermill record left in it
  before = nbformat.writes(nb)
  execute.strip(nb)
  assert nbformat.writes(nb) == before


def test_every_notebook_installs_the_same_way_and_opens_in_colab():
  url = _repo_url()
  owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", url).group(1)
  installs = set()
  for name in execute.NAMES:
    nb = _load(name)
    install = _tagged(nb, "install").source
    installs.add(install)
    assert url in install and "find_spec(\"jlora\") is None" in install
    badge = (f"https://colab.research.google.com/github/{owner_repo}/blob/main/"
             f"notebooks/{name}.ipynb")
    assert badge in nb.cells[0].source
    assert nb.cells.index(_tagged(nb, "install")) < nb.cells.index(_tagged(nb, "parameters"))
  assert len(installs) == 1, "the install cells differ between notebooks"
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  for name in execute.NAMES:
    assert f"(notebooks/{name}.ipynb)" in readme
    assert f"colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{name}.ipynb" \
        in readme


def test_errors_finds_an_error_output():
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1/0")])
  nb.cells[0].outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError",
                                                evalue="division by zero", traceback=[])]
  assert execute.errors(nb) == ["cell 0: ZeroDivisionError: division by zero"]


def _markdown_outputs(nb) -> str:
  return "\n".join(o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if "text/markdown" in o.get("data", {}))


def _text(nb) -> str:
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", execute.NAMES)
def test_notebook_runs_end_to_end_small(name, tmp_path, record_property):
  nb, seconds = execute.execute(name, out=str(tmp_path / f"{name}.ipynb"), cwd=str(tmp_path))
  record_property("notebook_seconds", round(seconds, 1))
  assert execute.errors(nb) == []
  text = _text(nb)
  if name in ("quickstart", "rl"):
    assert "| prompt | answer |" in _markdown_outputs(nb)  # answers before and after
    assert (tmp_path / "runs").is_dir()  # runs landed in the working directory
  if name == "quickstart":
    assert "kernels," in text and "LoRA params" in text  # describe()
    assert "OK    coverage" in text  # the advisor's report
  if name == "functional_api":
    diffs = [float(v) for v in re.findall(r"max \|apply(?:_nnx)? - merged\|: (\S+)", text)]
    assert len(diffs) == 2 and max(diffs) < 1e-4
    assert "8 devices" in text
    gap = float(re.search(r"one-device run's losses: (\S+)", text).group(1))
    assert gap < 1e-4  # data-parallel over 8 devices computes the same losses
  if name == "findings":
    shown = _markdown_outputs(nb)
    assert "report.md" in text and "| [rank](rank/report.md) |" in shown
    assert "\njlora study compute --budget smoke\n" in shown  # the equivalent command line
