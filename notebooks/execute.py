"""Execute the notebooks headless (papermill), as CI does and as a maintainer refreshes them.

  python notebooks/execute.py                 # every notebook, CI's small parameters
  python notebooks/execute.py quickstart --full --write   # full size, outputs committed

Small runs write to a scratch directory and leave the committed notebooks alone; `--write`
replaces notebooks/NAME.ipynb with the executed copy, its volatile metadata (timings,
papermill's record) stripped so that a rerun changes only what the outputs changed. Each
notebook runs in its own working directory (its runs/ and studies/ land there). Exits 1
if any cell raised, naming the notebook and the cell.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("quickstart", "functional_api", "findings", "rl")

# CI's parameters (the papermill "parameters" cell's names): every notebook end to end in
# about a minute each on 2 cores. A user edits the parameters cell instead.
SMALL = {
    "quickstart": {"STEPS": 3, "BATCH_ROWS": 2, "SEQ_LEN": 64, "EVAL_EXAMPLES": 4, "SHOW": 2},
    "functional_api": {"STEPS": 20, "EXAMPLES": 128, "BATCH": 32},
    "findings": {"STUDY": "compute", "BUDGET": "smoke"},
    "rl": {"SFT_STEPS": 2, "RL_STEPS": 2, "PROMPTS": 2, "GROUP": 2, "MAX_NEW_TOKENS": 4,
           "EVAL_EXAMPLES": 4, "EVAL_EVERY": 2, "SHOW": 2},
}

# Metadata that changes on every execution: papermill's record and nbclient's timings.
_VOLATILE_NB = ("papermill", "jupytext", "widgets")
_VOLATILE_CELL = ("papermill", "execution", "ExecuteTime")


def path(name: str) -> str:
  return os.path.join(HERE, f"{name}.ipynb")


def strip(nb) -> None:
  """Drop volatile metadata in place (nbstripout would drop the outputs too: we keep them,
  so that GitHub shows the plots)."""
  for key in _VOLATILE_NB:
    nb.metadata.pop(key, None)
  nb.metadata.get("language_info", {}).pop("version", None)
  for cell in nb.cells:
    for key in _VOLATILE_CELL:
      cell.metadata.pop(key, None)


def errors(nb) -> list[str]:
  """'cell N: ename: evalue' for each error output of an executed notebook."""
  out = []
  for i, cell in enumerate(nb.cells):
    for output in cell.get("outputs", []):
      if output.get("output_type") == "error":
        out.append(f"cell {i}: {output.get('ename')}: {output.get('evalue')}")
  return out


def execute(name: str, *, small: bool = True, out: str | None = None,
            cwd: str | None = None) -> tuple[object, float]:
  """Run notebook ``name`` top to bottom; returns (executed notebook, seconds). Raises
  papermill's PapermillExecutionError on a cell error."""
  import nbformat
  import papermill

  out = out or os.path.join(tempfile.mkdtemp(prefix=f"nb_{name}_"), f"{name}.ipynb")
  cwd = cwd or os.path.dirname(out)
  start = time.perf_counter()
  papermill.execute_notebook(path(name), out, parameters=SMALL[name] if small else None,
                             cwd=cwd, kernel_name="python3", progress_bar=False,
                             log_output=False)
  seconds = time.perf_counter() - start
  nb = nbformat.read(out, as_version=4)
  strip(nb)
  nbformat.write(nb, out)
  return nb, seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", metavar="NAME",
                      help=f"notebooks to run ({', '.join(NAMES)}; default all)")
  parser.add_argument("--full", action="store_true",
                      help="the notebook's own parameters, not CI's small ones")
  parser.add_argument("--write", action="store_true",
                      help="replace notebooks/NAME.ipynb with the executed notebook")
  args = parser.parse_args(argv)
  unknown = [n for n in args.names if n not in NAMES]
  if unknown:
    parser.error(f"unknown notebook {unknown[0]!r}; one of {', '.join(NAMES)}")
  import papermill
  failed = 0
  for name in args.names or NAMES:
    work = tempfile.mkdtemp(prefix=f"nb_{name}_")
    out = path(name) if args.write else os.path.join(work, f"{name}.ipynb")
    try:
      _, seconds = execute(name, small=not args.full, out=out, cwd=work)
    except papermill.PapermillExecutionError as e:
      print(f"{name}: FAILED in cell {e.cell_index}: {e.ename}: {e.evalue}", file=sys.stderr)
      failed += 1
      continue
    print(f"{name}: {seconds:.0f} s -> {out}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
