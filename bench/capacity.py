"""Capacity (FINDINGS 5) moved into ``jlora study capacity`` (jlora/study/capacity.py), the
same protocol: random facts, a tiny Llama with a word-level tokenizer taught the format on
another table, FullFT and LoRA at several ranks on the same batches, final loss in bits
per answer, separation rank vs the advisor's 2-bits-per-parameter threshold.
``--budget full`` is the 1000-exposure measurement in bench/RESULTS.md (2000 facts, 31,250
steps); the flags of the former script (``--steps``, ``--ranks``, ...) are in git history
before this change.

    python -m bench.capacity [--budget smoke|small|full] [--out DIR]   (= jlora study capacity)
"""

import sys

from jlora import cli

if __name__ == "__main__":
  sys.exit(cli.main(["study", "capacity", *sys.argv[1:]]))
