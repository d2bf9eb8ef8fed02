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
  _data_parser(sub.add_parser("data", help="build, fetch and inspect datasets"))
  return parser


def _data_parser(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="data_command", required=True)
  build = sub.add_parser("build", help="local JSONL/Parquet/text files -> a TFDS ArrayRecord "
                         "dataset (read back by giving its directory as a source)")
  build.add_argument("source", help="train split: a file or directory")
  build.add_argument("--out", required=True, help="data directory to write into")
  build.add_argument("--name", required=True, help="dataset name (lower_snake_case)")
  build.add_argument("--split", action="append", default=[], metavar="NAME=PATH",
                     help="another split, e.g. test=held_out.jsonl (repeatable)")
  build.add_argument("--separator", default="\n\n",
                     help="document separator for plain text (escapes allowed)")
  stats = sub.add_parser("stats", help="examples, tokens, trained tokens, information estimate")
  stats.add_argument("source", help="a path, tfds:NAME or task:NAME")
  stats.add_argument("--model", required=True, help="model dir or .gguf whose tokenizer to use")
  stats.add_argument("--format", default="auto")
  stats.add_argument("--seq-len", type=_positive_int, default=512)
  stats.add_argument("--overflow", default="truncate")
  stats.add_argument("--split", default="train")
  stats.add_argument("--separator", default="\n\n")
  stats.add_argument("--limit", type=_positive_int, default=None,
                     help="encode only this many evenly spaced records and scale up")
  fetch = sub.add_parser("fetch", help="a text corpus from Debian packages (apt-get download)")
  fetch.add_argument("corpus", help="e.g. fortunes")
  fetch.add_argument("--out", required=True)


def _unescape(text: str) -> str:
  return text.encode().decode("unicode_escape")


def _data(args) -> None:
  from jlora import data
  if args.data_command == "build":
    from jlora.data import builder
    splits = {"train": args.source}
    for item in args.split:
      name, sep, path = item.partition("=")
      if not sep or not name or not path:
        raise ValueError(f"--split {item!r}: expected NAME=PATH")
      splits[name] = path
    out = builder.build(splits, args.out, args.name, separator=_unescape(args.separator))
    print(f"built {args.name} ({', '.join(splits)}) -> {out}")
  elif args.data_command == "stats":
    cfg = data.DataConfig(source=args.source, format=args.format, seq_len=args.seq_len,
                          overflow=args.overflow, split=args.split,
                          separator=_unescape(args.separator))
    print(data.stats(cfg, data.Tokenizer.from_model(args.model), limit=args.limit))
  elif args.data_command == "fetch":
    from jlora.data import debian
    out = debian.fetch(args.corpus, args.out)
    print(f"{args.corpus} -> {out} (documents separated by {debian.separator(args.corpus)!r})")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "demo":
      from jlora import demo
      demo.run(rank=args.rank, steps=args.steps, lr=args.lr, seed=args.seed)
    elif args.command == "data":
      _data(args)
  except ValueError as e:  # jlora raises ValueError for bad user input
    if os.environ.get("JLORA_DEBUG"):
      raise
    print(f"jlora: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
