"""The ``jlora`` command. User mistakes end in one line on stderr and exit code 2; set
JLORA_DEBUG=1 to see the traceback instead. SIGTERM and Ctrl-C stop a training run after
its step in flight, with a checkpoint (exit 0 and 130); anywhere else they stop the
command at once, with the same exit codes."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import traceback


class _Terminated(Exception):
  """SIGTERM outside the training loop (which defers it itself)."""


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _parser() -> argparse.ArgumentParser:
  from jlora import __version__
  parser = argparse.ArgumentParser(prog="jlora", description=__doc__)
  parser.add_argument("--version", action="version", version=f"jlora {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="a short LoRA fit of a small model (seconds, any CPU)")
  demo.add_argument("--rank", type=_positive_int, default=8)
  demo.add_argument("--steps", type=_positive_int, default=300)
  demo.add_argument("--lr", type=float, default=3e-3)
  demo.add_argument("--seed", type=int, default=0)
  _run_parsers(sub)
  adv = sub.add_parser("advise", help="check a recipe against the findings (no training)")
  adv.add_argument("config", nargs="+", help="one recipe, or several to train together "
                   "(each is checked, and the group's shared keys)")
  adv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting (of every recipe)")
  _trained_parsers(sub)
  _data_parser(sub.add_parser("data", help="build, fetch and inspect datasets"))
  _study_parser(sub.add_parser("study", help="reproduce a finding of LoRA Without Regret on "
                               "a model, with plots and a verdict (DIR/report.md)"))
  return parser


def _run_parsers(sub) -> None:
  """A command per registered objective (``jlora train``, ``jlora rl``, ...): a recipe,
  overrides, resume, processes."""
  from jlora.run import driver, group
  for kind in driver.KINDS.values():
    run = sub.add_parser(kind.command, help=kind.help)
    together = (f"; several: trained together over one base, sharing "
                f"{', '.join(group.SHARED + kind.group.shared)} (jlora.run.group)"
                if kind.group else "; one")
    run.add_argument("config", nargs="+", help=f"recipe file, e.g. {kind.example}{together}")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. --set train.steps=50 (repeatable; "
                          "with several recipes, of every one)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in run_dir from its last checkpoint (several "
                          "recipes: each run from its own)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--force", action="store_true",
                     help="train even when the advisor reports an error")
    run.add_argument("--distributed", choices=("env", "auto", "off"), default="env",
                     help="several processes, one run: 'env' joins when JLORA_COORDINATOR, "
                          "JLORA_NUM_PROCESSES and JLORA_PROCESS_ID are set (default); "
                          "'auto' lets JAX detect the cluster (TPU pod slice, SLURM); 'off'")
    run.add_argument("--events", metavar="FILE", default=None,
                     help="append what the run does (phases, metrics rows, checkpoints) to "
                          "FILE, one JSON object a line (jlora.run.events)")
    run.add_argument("--cpu-devices", type=_positive_int, default=None, metavar="N",
                     help="N fake CPU devices, to try sharding without accelerators "
                          "(default: $JLORA_CPU_DEVICES)")


def _trained_parsers(sub) -> None:
  """What reads a trained run (``generate``, ``export``, ``merge``) or a PEFT adapter."""
  gen = sub.add_parser("generate", help="sample from a run's base model + adapters; with "
                       "several runs over one base, each answers, all in one batch")
  gen.add_argument("run_dir", nargs="+")
  gen.add_argument("--prompt", required=True)
  gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
  gen.add_argument("--temperature", type=float, default=0.0)
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  gen.add_argument("--no-chat", action="store_true",
                   help="feed the prompt as plain text, not a chat user turn")
  exp = sub.add_parser("export", help="a run's adapters as a Hugging Face PEFT adapter or "
                       "a llama.cpp LoRA adapter (GGUF)")
  exp.add_argument("run_dir")
  exp.add_argument("--format", choices=["peft", "gguf"], default="peft",
                   help="peft: a PEFT adapter directory; gguf: one llama.cpp LoRA adapter "
                        "file (llama-cli --lora, ollama ADAPTER)")
  exp.add_argument("--out", required=True,
                   help="new directory for the adapter (gguf: a new .gguf file)")
  exp.add_argument("--dtype", choices=["f32", "f16"], default="f32",
                   help="--format gguf: the factors' type (default f32)")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  exp.add_argument("--moe-layout", choices=["per-expert", "fused"], default="per-expert",
                   help="MoE experts: 2-D factors per expert (serving engines) or PEFT's "
                        "target_parameters on the fused expert tensors")
  imp = sub.add_parser("import-peft", help="check a PEFT LoRA adapter (or a llama.cpp one, "
                       "a .gguf file) against a base model (and convert it for lora.init)")
  imp.add_argument("adapter_dir")
  imp.add_argument("--model", required=True,
                   help="the base: HF model dir, .gguf file, Hub id or smollm2")
  merge = sub.add_parser("merge", help="base + a run's adapters merged into an HF model dir")
  merge.add_argument("run_dir")
  merge.add_argument("--out", required=True, help="new directory for the merged model")
  merge.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  merge.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
  merge.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="of the merged weights (default: the base checkpoint's; float32 "
                          "for a quantised GGUF)")


def _study_parser(study: argparse.ArgumentParser) -> None:
  study.add_argument("name", help="layers, lr, rank, batch, capacity, compute, rl, or all "
                                  "(every study into --out/NAME, then --out/index.md)")
  study.add_argument("--model", default=None,
                     help="HF model dir or .gguf (default: a tiny random model at smoke, "
                          "SmolLM2-135M-Instruct otherwise)")
  study.add_argument("--budget", default="small",
                     help="smoke (seconds), small (a 2-core CPU, ~1 h) or full (GPU/TPU)")
  study.add_argument("--out", default=None, help="study directory (default studies/NAME-BUDGET);"
                     " rerunning continues it")
  study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting of every arm, e.g. --set data.seq_len=128")
  study.add_argument("--seeds", type=_positive_int, default=1, metavar="K",
                     help="train every arm at K seeds (seed k moves train.seed and the data "
                          "order by k; the base and held-out set stay): an arm per seed in "
                          "results.csv; a rerun with more seeds reuses the finished ones")


def _interop(args) -> None:
  from jlora.run import trained
  if args.command == "export":
    out = trained.export_run(args.run_dir, args.out, args.step, moe_layout=args.moe_layout,
                             format=args.format, dtype=args.dtype)
    print(f"PEFT adapter -> {out} (load with peft.PeftModel.from_pretrained)"
          if args.format == "peft" else
          f"llama.cpp LoRA adapter -> {out} (llama-cli -m BASE.gguf --lora {out})")
  elif args.command == "merge":
    out = trained.merge_run(args.run_dir, args.out, args.step, args.max_shard_size,
                            dtype=args.dtype)
    print(f"merged model -> {out} (load with transformers.AutoModelForCausalLM)")
  else:
    from jlora import models
    from jlora.core import lora
    from jlora.interop import adapters as adapters_lib
    _, params, cfg = models.load(args.model)
    adapters, spec, _ = adapters_lib.load(args.adapter_dir, params, cfg)
    print(lora.describe(params, spec))
    print(f"{args.adapter_dir}: {lora.count_params(adapters):,} adapter params fit "
          f"{args.model}; train from it with lora.init = \"{args.adapter_dir}\"")


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
  stats.add_argument("--model", required=True,
                     help="model dir, .gguf, Hub id or smollm2 whose tokenizer to use")
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


def _summary_line(summary: dict, run_dir: str) -> str:
  parts = [f"{summary['steps']} steps"]
  for key in summary:  # every held-out metric measured before and after (the objective's)
    name = key.removesuffix("_before")
    a, b = summary.get(f"{name}_before"), summary.get(f"{name}_after")
    if key.endswith("_before") and isinstance(a, (int, float)) and isinstance(b, (int, float)):
      parts.append(f"held-out {name.replace('eval_', '')} {a:.4g} -> {b:.4g}")
  return f"done: {', '.join(parts)}; run in {run_dir} (summary.json)"


def _train(args) -> int:
  from jlora.infra import multihost
  from jlora.run import checkpoint, driver, events, loop
  multihost.cpu_devices(args.cpu_devices)  # before anything touches a device
  kind = driver.KINDS[args.command]
  cfgs = []
  for path in args.config:
    try:
      cfgs.append(driver.load(path, args.set, kind))
    except ValueError as e:
      named = len(args.config) == 1 or str(e).startswith(path)
      raise ValueError(str(e) if named else f"{path}: {e}") from None
  multihost.join(args.distributed)  # a config that does not parse never gets this far
  listener = events.JsonLines(args.events) if args.events and multihost.primary() else None
  try:
    if len(cfgs) > 1:
      return _group_summaries(args, cfgs, driver.run_group(
          cfgs, kind, args.config, resume=args.resume, progress=not args.no_progress,
          force=args.force, on_event=listener))
    cfg = cfgs[0]
    summary = driver.run(cfg, kind, resume=args.resume, progress=not args.no_progress,
                         force=args.force, on_event=listener)
  except loop.NonFiniteLoss as e:
    print(f"jlora: {e}", file=sys.stderr)
    return 1
  except loop.Interrupted as e:
    print(f"jlora: {e}; resume with: {_resume_command(args)}", file=sys.stderr)
    return e.exit_code
  except checkpoint.StorageFailed as e:
    again = f"; resume with: {_resume_command(args)}" if e.step is not None else ""
    print(f"jlora: error: {e}{again}", file=sys.stderr)
    return _stopping(2, f"error: {e}")
  finally:
    if listener is not None:
      listener.close()
  print(_summary_line(summary, cfg.run_dir))
  return 0


def _group_summaries(args, cfgs: list, outcomes: list) -> int:
  """Each run's line; exit 1 when any run stopped non-finite (the others finished)."""
  from jlora.run import loop
  code = 0
  for path, cfg, outcome in zip(args.config, cfgs, outcomes):
    if isinstance(outcome, loop.NonFiniteLoss):
      print(f"jlora: {path}: {outcome}", file=sys.stderr)
      code = 1
    else:
      print(f"{path}: {_summary_line(outcome, cfg.run_dir)}")
  return code


def _resume_command(args) -> str:
  return shlex.join(["jlora", args.command, *args.config] + [f"--set={x}" for x in args.set]
                    + ["--resume"])


def _study(args) -> int:
  from jlora import study
  from jlora.run import loop
  try:
    if args.name == "all":
      study.run_all(budget=args.budget, out=args.out, model=args.model, overrides=args.set,
                    argv=["jlora"] + sys.argv[1:], seeds=args.seeds)
    else:
      study.run(args.name, budget=args.budget, out=args.out, model=args.model,
                overrides=args.set, argv=["jlora"] + sys.argv[1:], seeds=args.seeds)
  except loop.Interrupted as e:
    print(f"jlora: {e}; the study continues where it stopped when run again with the same "
          "command", file=sys.stderr)
    return e.exit_code
  return 0


def _run(args) -> int:
  from jlora.run import driver
  if args.command == "demo":
    from jlora import demo
    demo.run(rank=args.rank, steps=args.steps, lr=args.lr, seed=args.seed)
  elif args.command == "data":
    _data(args)
  elif args.command in ("export", "import-peft", "merge"):
    _interop(args)
  elif args.command in driver.KINDS:
    return _train(args)
  elif args.command == "study":
    return _study(args)
  elif args.command == "advise":
    from jlora.findings import advisor
    from jlora.run import config
    from jlora.run import group
    cfgs = [config.load(path, args.set) for path in args.config]
    if len(cfgs) > 1:
      kind = driver.kind_of(cfgs[0])
      group.check(cfgs, args.config, group.SHARED + (kind.group.shared if kind.group else ()))
    failed = False
    for path, cfg in zip(args.config, cfgs):
      findings, stats = driver.advise(cfg, driver.kind_of(cfg))
      if len(cfgs) > 1:
        print(f"== {path}")
      print(f"data: {stats}")
      print(advisor.report(findings))
      failed = failed or advisor.has_error(findings)
    return 1 if failed else 0
  elif args.command == "generate":
    from jlora.run import trained
    said = trained.generate_each(args.run_dir, args.prompt,
                                 max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, seed=args.seed, step=args.step,
                                 chat=not args.no_chat)
    for run_dir, text in zip(args.run_dir, said):
      if len(said) > 1:
        print(f"== {run_dir}")
      print(text)
  return 0


def _raise_terminated(signum, frame):
  raise _Terminated()


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  in_main = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
  try:
    return _run(args)
  except ValueError as e:  # jlora raises ValueError for bad user input
    if os.environ.get("JLORA_DEBUG"):
      raise
    print(f"jlora: error: {e}", file=sys.stderr)
    return _stopping(2, f"error: {e}")
  except (KeyboardInterrupt, _Terminated) as e:
    name = "SIGINT" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
    print(f"jlora: {name}: stopped (outside training steps: nothing new was saved)",
          file=sys.stderr)
    return _stopping(130 if isinstance(e, KeyboardInterrupt) else 0, name)
  except Exception as e:  # an internal error keeps its traceback
    from jlora.infra import multihost
    if not multihost.joined():
      raise
    first = (str(e).splitlines() or [""])[0][:200]
    if multihost.peer_lost(e):  # the watchdog names the process that is gone, and exits
      multihost.await_watchdog()
      print(f"jlora: {multihost.name()}: a collective failed ({first})", file=sys.stderr)
    else:
      traceback.print_exc()
    return _stopping(1, f"{type(e).__name__}: {first}")
  finally:
    if in_main:
      signal.signal(signal.SIGTERM, previous)


def _stopping(code: int, why: str) -> int:
  """The exit of a run stopped by this process alone. With several processes the others
  are told (they end with one line naming this one) and this one leaves at once: JAX's
  orderly shutdown would wait for processes that are not coming."""
  from jlora.infra import multihost
  if not multihost.joined():
    return code
  multihost.fail(why)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == "__main__":
  sys.exit(main())
