"""The ``jlora`` command. User mistakes end in one line on stderr and exit code 2; set
JLORA_DEBUG=1 to see the traceback instead."""

from __future__ import annotations

import argparse
import os
import sys


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jlora", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="a short LoRA fit of a small model (seconds, any CPU)")
  demo.add_argument("--rank", type=_positive_int, default=8)
  demo.add_argument("--steps", type=_positive_int, default=300)
  demo.add_argument("--lr", type=float, default=3e-3)
  demo.add_argument("--seed", type=int, default=0)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "demo":
      from jlora import demo
      demo.run(rank=args.rank, steps=args.steps, lr=args.lr, seed=args.seed)
  except ValueError as e:  # jlora raises ValueError for bad user input
    if os.environ.get("JLORA_DEBUG"):
      raise
    print(f"jlora: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
