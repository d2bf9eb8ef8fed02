"""What RL can still teach a model on ``task:arithmetic``: greedy accuracy against pass@k
of sampled answers, per operation, on the held-out problems.

    python -m bench.rl_passk [MODEL] [--k 16] [--max-new-tokens 8]

MODEL defaults to the quickstart's merged model (``runs/quickstart_merged``); the problems
and the prompts' rendering are the recipe's (``--config``: its held-out split, as its
evaluation reads them). A problem the
model never answers right in k samples gives a group of k no signal (every advantage 0);
one it sometimes gets right is what policy-gradient RL can move towards greedy.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from jlora import data, models
from jlora.data import render
from jlora.objectives.rl import rewards
from jlora.objectives.rl.rollouts import left_pad
from jlora.run import evaluate


def _correct(tok, out, answers, k):
  texts = [tok.decode(evaluate.until_eos(row[:n], tok.eos_id))
           for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]
  return np.array([rewards.correct(t, answers[i // k]) for i, t in enumerate(texts)]
                  ).reshape(len(answers), k)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("model", nargs="?", default="runs/quickstart_merged")
  p.add_argument("--k", type=int, default=16)
  p.add_argument("--max-new-tokens", type=int, default=8)
  p.add_argument("--config", default="configs/rl_arithmetic.toml",
                  help="the RL recipe whose held-out problems and prompts are used")
  args = p.parse_args(argv)
  from jlora.objectives import rl
  cfg = rl.load_config(args.config)
  model, params, _ = models.load(args.model)
  tok = data.Tokenizer.from_model(args.model)
  source = data.open_source(evaluate.eval_data_config(cfg))  # the run's held-out problems
  records = [source[i] for i in range(min(cfg.eval.examples, len(source)))]
  answers = [r["answer"] for r in records]
  d = cfg.data
  ids = [render.prompt_ids(r, tok, d.fields, d.chat, d.system) for r in records]
  tokens, mask = left_pad(ids, models.bucket(max(map(len, ids)), 8))
  common = dict(max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id, pad=tok.eos_id)
  sampled = _correct(tok, models.sample(model, params, tokens, mask, jax.random.PRNGKey(0),
                                        group=args.k, temperature=1.0, **common),
                     answers, args.k)
  greedy = _correct(tok, models.sample(model, params, tokens, mask, jax.random.PRNGKey(0),
                                       temperature=0.0, **common), answers, 1)[:, 0]
  ops = [r["prompt"].split()[3] for r in records]
  out = {"problems": len(records), "k": args.k}
  for op in ["all", *sorted(set(ops))]:
    sel = np.array([op in ("all", o) for o in ops])
    out[op] = {"problems": int(sel.sum()), "greedy": float(greedy[sel].mean()),
               "sampled": float(sampled[sel].mean()),
               **{f"pass@{j}": float(sampled[sel, :j].any(1).mean())
                  for j in (1, 4, 8, args.k) if j <= args.k}}
  print(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
