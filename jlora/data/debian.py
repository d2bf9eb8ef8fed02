"""Text corpora from Debian packages, fetched without root: ``apt-get download`` (Debian
mirrors are reachable where the internet is not) and ``dpkg-deb -x`` into a directory.

``jlora data fetch fortunes --out DIR`` leaves the fortune files (entries separated by
``%`` lines: use ``separator: "\\n%\\n"``) under ``DIR/fortunes``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

CORPORA = {
    # name: (packages, glob of the text files inside the extracted tree, document separator)
    "fortunes": (("fortunes-min", "fortunes"), "usr/share/games/fortunes/*", "\n%\n"),
}


def fetch(name: str, out_dir: str) -> str:
  """Download and extract corpus ``name``; returns the directory of its text files."""
  if name not in CORPORA:
    raise ValueError(f"unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}")
  for tool in ("apt-get", "dpkg-deb"):
    if shutil.which(tool) is None:
      raise ValueError(f"{tool} is not installed: fetching Debian corpora needs a Debian system")
  packages, pattern, _ = CORPORA[name]
  target = os.path.join(out_dir, name)
  os.makedirs(target, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    done = subprocess.run(["apt-get", "download", *packages], cwd=tmp, capture_output=True,
                          text=True)
    if done.returncode:
      raise ValueError(f"apt-get download {' '.join(packages)} failed: "
                       f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    tree = os.path.join(tmp, "tree")
    for deb in glob.glob(os.path.join(tmp, "*.deb")):
      subprocess.run(["dpkg-deb", "-x", deb, tree], check=True)
    # Text files only: the .dat indexes and the symlinked offensive variants are skipped.
    files = [f for f in glob.glob(os.path.join(tree, pattern))
             if os.path.isfile(f) and not os.path.islink(f) and not f.endswith(".dat")]
    if not files:
      raise ValueError(f"{name}: the packages held no files matching {pattern}")
    for f in files:
      shutil.copy(f, os.path.join(target, os.path.basename(f)))
  return target


def separator(name: str) -> str:
  return CORPORA[name][2]
