"""Capacity (FINDINGS 5): where does LoRA fall behind full fine-tuning on pure
memorisation, and does the advisor's threshold rank predict it?

The data is ``task:facts``: made-up keys with uniform random answers among 100, so every
answer carries exactly log2(100) bits and nothing generalises. The model is a tiny random
Llama with a word-level tokenizer in which every key and every answer is one token (so
a fact is "What is the code of KEY ? VALUE <eos>", 9 tokens, and storing it, not parsing
it, is the work). The base is first taught the format and the lookup on *another* table
(full fine-tuning, seed 1), so every method starts at ~log2(100) bits per answer on the
experiment's table (seed 0), whose key embeddings the base has never trained. Then full
fine-tuning and LoRA (all layers, alpha 32) at several ranks each train the same steps on
the same batches, each with the best LR of a small sweep. Measured: the final loss over
the whole table, in bits per answer.

The separation rank is the smallest rank whose final loss is within ``--margin`` bits per
answer of full fine-tuning's; the advisor's threshold is the rank it says "would hold" the
data (2 bits per LoRA parameter). The issue asks them to agree within 2x.

  python -m bench.capacity [--facts 2000] [--steps 6000] [--append]

Status (2026-11-23, bench/RESULTS.md): LoRA stores ~1 bit per parameter here, half the
2 bits/param of the rule, even after 1000 exposures per fact (``--steps 31250``): ranks 2
and 4 store 0.96 and 1.03 bits/param. Fewer exposures store less (0.6-0.8 at 192).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp

import jlora
from jlora import advisor, config, data, optim, setup, train
from bench.common import machine

RANKS = (1, 2, 4, 8, 16)
LR_FULL = (1e-3, 3e-3)
LR_LORA = (1e-3, 3e-3)
BITS = math.log2(100)


def make_model_dir(out: str, facts: int, hidden: int) -> str:
  """A tiny random Llama (transformers) + a word-level tokenizer over both fact tables."""
  import tokenizers
  from tokenizers import models as tok_models, pre_tokenizers
  from jlora.data import tasks
  from tests.hf_models import save_tiny
  words = ["<unk>", "<eos>", "What", "is", "the", "code", "of", "?"]
  words += [str(v) for v in range(100)]
  for seed in (0, 1):
    table = tasks.source("facts", seed=seed, size=facts)
    words += [table[i]["prompt"].split()[-1].rstrip("?") for i in range(facts)]
  vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
  path = save_tiny("llama", out, vocab_size=len(vocab), hidden_size=hidden,
                   intermediate_size=2 * hidden, num_attention_heads=4,
                   num_key_value_heads=4)
  tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<eos>"}, f)
  return path


def _recipe(model_dir, run_dir, facts, seed, method, rank, lr, steps, batch,
            schedule="constant"):
  return config.from_dict({
      "run_dir": run_dir, "model": {"path": model_dir, "remat": False},
      "lora": {"rank": rank, "alpha": 32},
      "train": {"method": method, "steps": steps, "lr": lr, "grad_clip": 0.0,
                "schedule": schedule},
      "data": {"source": "task:facts", "size": facts, "seed": seed, "seq_len": 16,
               "pack": False, "batch_size": batch, "chat": False, "prefetch": 0},
      "eval": {"batches": 0, "examples": 0}})


def _nll_bits(s: setup.Setup, trainable, cfg) -> float:
  """Total cross-entropy over the answers of the whole fact table, in bits."""
  dcfg = dataclasses.replace(cfg.data, shuffle=False, epochs=1)
  lm_loss = train.lm_loss(s.model, s.plan)

  @jax.jit
  def loss(trainable, batch):
    return lm_loss(trainable, s.frozen, batch)[0]

  total = sum(float(loss(trainable, b)) for b in data.dataset(dcfg, s.tok,
                                                               drop_remainder=False))
  return total / math.log(2)


def _from_base(s: setup.Setup, base_params) -> setup.Setup:
  """``s`` starting from the format-trained base instead of the model file."""
  adapters = {} if s.cfg.train.method == "full" else jlora.init_adapters(
      base_params, s.plan, jax.random.PRNGKey(s.cfg.train.seed))
  trainable, frozen = optim.trainable(base_params, adapters, s.plan)
  trainable = jax.tree_util.tree_map(jnp.copy, trainable)  # the step donates it
  return dataclasses.replace(s, trainable=trainable, frozen=frozen)


_BATCHES = {}


def _batches(cfg, tok) -> list:
  """The run's batches, made once per table and shared by every method: the same examples
  in the same order for all. The pipeline is run for 20 epochs (each reshuffled) and
  long runs cycle through them (the pipeline's CPU time is not paid per step and run)."""
  key = (cfg.data.seed, cfg.data.size, cfg.data.batch_size)
  if key not in _BATCHES:
    it = iter(data.dataset(cfg.data, tok))
    epochs = 20 * math.ceil(cfg.data.size / cfg.data.batch_size)
    _BATCHES[key] = [next(it) for _ in range(epochs)]
  return _BATCHES[key]


def _train(cfg, base_params=None):
  """Train one config; returns (setup, trainable) after ``cfg.train.steps`` steps."""
  s = setup.build(cfg, log=lambda _: None)
  if base_params is not None:
    s = _from_base(s, base_params)
  state = train.init_state(s.trainable, s.tx, s.mesh)
  # The plain loss (no train.loss_chunk): the word-level vocabulary is small.
  step = train.jit_step(train.make_step(train.lm_loss(s.model, s.plan), s.tx), state,
                        s.frozen, s.mesh)
  batches = _batches(cfg, s.tok)
  for i in range(cfg.train.steps):
    state, metrics = step(state, s.frozen, batches[i % len(batches)])
    if os.environ.get("CAPACITY_DEBUG") and i % 250 == 0:
      print(i, float(metrics["loss"]), f"{time.time():.0f}", flush=True)
  jax.block_until_ready(state)
  return s, state["trainable"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--facts", type=int, default=2000)
  p.add_argument("--steps", type=int, default=6000)
  p.add_argument("--format-steps", type=int, default=1500)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--ranks", default=",".join(map(str, RANKS)))
  p.add_argument("--margin", type=float, default=0.5, help="bits per answer")
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--schedule", default="constant", choices=("constant", "cosine", "linear"),
                 help="LR schedule of the measured runs (the format run stays constant)")
  p.add_argument("--lr-full", default=",".join(map(str, LR_FULL)))
  p.add_argument("--lr-lora", default=",".join(map(str, LR_LORA)))
  p.add_argument("--full-bits", type=float, default=None,
                 help="reuse full fine-tuning's measured final loss (bits/answer) from an "
                      "earlier run with the same table and at most these steps, instead of "
                      "training it again")
  p.add_argument("--append", action="store_true", help="append the table to RESULTS.md")
  args = p.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix="jlora-capacity-")
  model_dir = make_model_dir(tmp, args.facts, args.hidden)
  run = os.path.join(tmp, "run")
  t0 = time.time()

  # 1. The base learns the format (and the answer alphabet) on another table.
  fmt = _recipe(model_dir, run, args.facts, 1, "full", 1, 3e-3, args.format_steps, args.batch)
  s, tr = _train(fmt)
  base = optim.model_params(tr, s.frozen, s.plan)
  info = args.facts * BITS
  rows = []

  def measure(method, rank, lrs):
    best = None
    for lr in lrs:
      cfg = _recipe(model_dir, run, args.facts, 0, method, rank, lr, args.steps, args.batch,
                    args.schedule)
      start = time.time()
      s, tr = _train(cfg, base)
      bits = _nll_bits(s, tr, cfg) / args.facts
      print(f"  {method} r={rank} lr={lr:g}: {bits:.3f} bits/answer ({time.time()-start:.0f} s)",
            flush=True)
      if best is None or bits < best[0]:
        best = (bits, lr)
    return best

  print(f"format: {time.time() - t0:.0f} s", flush=True)
  s0 = _from_base(setup.build(_recipe(model_dir, run, args.facts, 0, "full", 1, 1e-3, 1,
                                      args.batch), log=lambda _: None), base)
  before = _nll_bits(s0, s0.trainable, s0.cfg) / args.facts
  print(f"before: {before:.3f} bits/answer", flush=True)
  lrs = lambda text: [float(x) for x in text.split(",")]
  if args.full_bits is None:
    full_bits, full_lr = measure("full", 0, lrs(args.lr_full))
  else:  # reported as reused in the table
    full_bits, full_lr = args.full_bits, float("nan")
  ranks = [int(r) for r in args.ranks.split(",")]
  model_cfg = s0.model_cfg
  for r in ranks:
    bits, lr = measure("lora", r, lrs(args.lr_lora))
    params = sum(advisor.params_by_group(advisor.plan_for(model_cfg, r, "all",
                                                          alpha=32.0)).values())
    rows.append((r, params, bits, lr))

  # The advisor's threshold: the rank it says would hold the data (same rule as `advise`).
  finding = advisor._capacity(info, "exact", rows[0][1], rows[0][0], "lora")
  per_rank = rows[0][1] / rows[0][0]
  threshold = info / (advisor.BITS_PER_PARAM * per_rank)
  close = [r for r, _, bits, _ in rows if bits - full_bits <= args.margin]
  separation = min(close) if close else None
  ratio = None if separation is None else separation / threshold
  exposures = args.steps * args.batch / args.facts  # FINDINGS 5's 2 bits/param: ~1000

  lines = [f"### Capacity: LoRA vs full fine-tuning on {args.facts} random facts "
           f"({datetime.date.today()}, {machine()})", "",
           f"`python -m bench.capacity --facts {args.facts} --steps {args.steps}` (tiny Llama, "
           f"hidden {args.hidden}, 2 layers, word-level tokenizer; {args.steps} steps x "
           f"{args.batch} rows = {exposures:g} exposures per fact, {args.schedule} LR; "
           f"format pre-trained on another table for {args.format_steps} steps). Data: "
           f"{info:,.0f} bits ({args.facts} x log2(100)). Loss before: {before:.2f} "
           "bits/answer.", "",
           "| method | rank | trainable params | capacity (2 bits/param) | best LR | "
           "final loss (bits/answer) | gap to full | stored (bits/param) |",
           "|---|---|---|---|---|---|---|---|",
           f"| full | - | {sum(x.size for x in jax.tree_util.tree_leaves(base)):,} | - | "
           f"{full_lr:g} | {full_bits:.3f}"
           f"{' (reused: --full-bits)' if args.full_bits is not None else ''} | - | - |"]
  for r, params, bits, lr in rows:
    stored = (BITS - bits) * args.facts / params  # what the adapters hold, per parameter
    lines.append(f"| LoRA | {r} | {params:,} | {2 * params:,} | {lr:g} | {bits:.3f} | "
                 f"{bits - full_bits:+.3f} | {stored:.2f} |")
  lines += ["", f"Advisor threshold rank (2 bits/param): {threshold:.1f} "
            f"(its finding at rank {rows[0][0]}: \"{finding.message}\"). Measured separation "
            f"(smallest rank within {args.margin} bits/answer of full): "
            f"{separation}; ratio {ratio if ratio is None else f'{ratio:.2f}'} "
            f"(target within 2x). Total {time.time() - t0:.0f} s.", ""]
  text = "\n".join(lines)
  print(text)
  if args.append:
    with open(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "a") as f:
      f.write("\n" + text)
  return ratio


if __name__ == "__main__":
  main()
