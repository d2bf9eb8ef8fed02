"""One RL step, jlora vs TRL's GRPOTrainer (PEFT LoRA), side by side on this CPU.

    python -m bench.rl_step [--prompts 8 --group 4 --new-tokens 16 --steps 4] [--smoke]

Both run the same SmolLM2-135M-Instruct weights (``bench.rl_trl.hf_smollm2``: an f32 HF
copy of the GGUF; jlora loads that directory too), the same prompts (``task:arithmetic``
records, in order, the model's own chat template), the same group size, new-token limit,
rank-1 LoRA (alpha 32) on every linear layer, temperature 1, no KL, one optimizer step per
generation round, f32, 2 threads. Each framework runs in its own subprocess, one after the
other, so neither competes with the other for the two cores.

Reported, per framework: the median wall time of a step after the first (jlora: the run
loop's ``step_s``: sampling with the KV cache, rewards, the jitted update, in RL's grouped
layout and, for comparison, the per-row one; TRL: its
callback's step time: HF ``generate``, rewards, forward + backward, AdamW), and the
sampled tokens per second of generation alone at batch prompts x group with exactly
``new_tokens`` tokens per row (jlora ``models.sample`` with no EOS stop, each row its own
prompt, and with the group's prompt prefilled once as RL does; transformers ``generate``
with ``min_new_tokens = max_new_tokens``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from bench import common

HF_DIR = os.path.join(tempfile.gettempdir(), "jlora_bench_smollm2_hf")


def _prompts(n: int) -> tuple[list[str], list[str]]:
  from jlora.data import tasks
  source = tasks.source("arithmetic", "train")
  records = [source[i] for i in range(n)]
  return [r["prompt"] for r in records], [r["answer"] for r in records]


def jlora_step(model_dir: str, prompts: int, group: int, new_tokens: int, steps: int,
               per_row: bool = False) -> dict:
  """``jlora rl`` for ``steps`` steps; the loop's per-step wall times after the first.
  ``per_row``: the update in the per-row layout (each row its prompt and completion), not
  the grouped one RL uses (``rollouts.grouped``): what grouping buys, side by side."""
  from jlora.objectives import rl
  from jlora.objectives.rl import rollouts
  from jlora.run import config
  if per_row:
    rollouts.grouped = lambda *args: 1
  run_dir = tempfile.mkdtemp(prefix="jlora_rl_bench_")
  cfg = config.from_dict({
      "run_dir": os.path.join(run_dir, "run"),
      "model": {"path": model_dir, "remat": False},
      "data": {"source": "task:arithmetic", "shuffle": False},
      "train": {"steps": steps, "checkpoint_every": 1000, "lr": 1e-4},
      "eval": {"examples": 0},
      "rl": {"group_size": group, "prompts_per_step": prompts, "max_new_tokens": new_tokens,
             "track_kl": False}})
  rows = []
  rl.run(cfg, progress=False, log=lambda _: None, on_row=rows.append)
  rows = [r for r in rows if "step_s" in r]  # the steps' rows, not the held-out metrics
  later = rows[1:]
  return {"step_s": statistics.median(r["step_s"] for r in later),
          "sample_s": statistics.median(r["sample_s"] for r in later),
          "steps": [r["step_s"] for r in rows],
          "sampled_tokens": statistics.mean(r["completion_tokens"] * prompts * group
                                            for r in later)}


def jlora_generate(model_dir: str, prompts: list[str], batch: int, new_tokens: int,
                   group: int) -> dict:
  """Sampled tokens/s of ``models.sample`` at ``batch`` rows x exactly ``new_tokens``."""
  import jax
  from jlora import data, models
  from jlora.data import render
  from jlora.objectives.rl.rollouts import left_pad
  model, params, _ = models.load(model_dir)
  tok = data.Tokenizer.from_model(model_dir)
  ids = [render.prompt_ids({"prompt": p}, tok) for p in prompts]
  rows = [ids[i % len(ids)] for i in range(batch // group)]
  tokens, mask = left_pad(rows, models.bucket(max(map(len, rows))))
  run = lambda seed: jax.block_until_ready(models.sample(
      model, params, tokens, mask, jax.random.PRNGKey(seed), group=group,
      max_new_tokens=new_tokens).tokens)
  run(0)  # compile
  begin = time.perf_counter()
  for seed in (1, 2):
    run(seed)
  seconds = (time.perf_counter() - begin) / 2
  return {"tokens_per_s": batch * new_tokens / seconds, "seconds": seconds}


def _call(module: str, fn: str, **kwargs):
  """``module.fn(**kwargs)`` in a process of its own, JAX on the CPU, the Hub offline."""
  return common.call(module, fn, env={**common.CPU, "HF_HUB_OFFLINE": "1"}, **kwargs)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--prompts", type=int, default=8)
  p.add_argument("--group", type=int, default=4)
  p.add_argument("--new-tokens", type=int, default=16)
  p.add_argument("--steps", type=int, default=4, help="steps per framework (first dropped)")
  p.add_argument("--smoke", action="store_true", help="2 prompts x 2 x 4 tokens, 3 steps")
  args = p.parse_args(argv)
  if args.smoke:
    args.prompts, args.group, args.new_tokens, args.steps = 2, 2, 4, 3
  _call("bench.rl_trl", "hf_smollm2", out_dir=HF_DIR)
  prompts, answers = _prompts(args.prompts * args.steps)
  batch = args.prompts * args.group
  shape = dict(group_size=args.group, max_new_tokens=args.new_tokens,
               prompts_per_step=args.prompts, steps=args.steps)
  result = {"date": time.strftime("%Y-%m-%d"), "machine": common.machine(devices=False),
            "settings": vars(args)}
  result["jlora"] = _call("bench.rl_step", "jlora_step", model_dir=HF_DIR,
                          prompts=args.prompts, group=args.group,
                          new_tokens=args.new_tokens, steps=args.steps)
  result["jlora_per_row"] = _call("bench.rl_step", "jlora_step", model_dir=HF_DIR,
                                  prompts=args.prompts, group=args.group,
                                  new_tokens=args.new_tokens, steps=args.steps, per_row=True)
  result["trl"] = _call("bench.rl_trl", "trl_grpo_step_seconds", model_dir=HF_DIR,
                        prompts=prompts, answers=[int(a) for a in answers], lr=1e-4, **shape)
  result["ratio_step"] = result["jlora"]["step_s"] / result["trl"]["step_s"]
  result["ratio_step_per_row"] = result["jlora_per_row"]["step_s"] / result["trl"]["step_s"]
  for group in (1, args.group):
    result[f"jlora_generate_group{group}"] = _call(
        "bench.rl_step", "jlora_generate", model_dir=HF_DIR, prompts=prompts[:args.prompts],
        batch=batch, new_tokens=args.new_tokens, group=group)
  result["hf_generate"] = _call("bench.rl_trl", "hf_generate_tokens_per_s", model_dir=HF_DIR,
                                prompts=prompts[:args.prompts], batch=batch,
                                max_new_tokens=args.new_tokens)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
