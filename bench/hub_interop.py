"""The quickstart's exports, loaded the way a user elsewhere would (issue: Hub ids).

    python -m bench.hub_interop [--steps 15] [--prompts 8]

Trains configs/quickstart.toml (``train.steps`` overridden), then, offline:
1. puts SmolLM2-135M-Instruct in a Hugging Face cache built on disk under its Hub id
   (``HuggingFaceTB/SmolLM2-135M-Instruct``; the GGUF's weights as an f32 HF directory,
   which is what the run trained against), with ``HF_HUB_OFFLINE=1``;
2. ``jlora export`` -> ``peft.AutoPeftModelForCausalLM.from_pretrained(adapter)``, which
   finds the base by the id the export recorded;
3. ``jlora merge`` (default dtype: float32 for this GGUF base) and ``--dtype bfloat16`` ->
   ``transformers.AutoModelForCausalLM``;
and compares each one's greedy answers to the held-out prompts (token for token, the
prompts as jlora renders them) with the trained run's own.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from bench import common


def torch_answers(kind: str, path: str, max_new: int, prompts: list[list[int]]) -> dict:
  """Greedy answers (token ids) of the model at ``path``, loaded as a user elsewhere would:
  ``kind`` "peft" (``AutoPeftModelForCausalLM``: the base found by the id the adapter
  recorded, which is returned too) or "merged" (``AutoModelForCausalLM``). For a process of
  its own (torch only; the Hub cache and offline mode from its environment)."""
  import peft
  import torch
  import transformers
  auto = peft.AutoPeftModelForCausalLM if kind == "peft" else transformers.AutoModelForCausalLM
  model = auto.from_pretrained(path, dtype=torch.float32).eval()
  out = []
  for p in prompts:
    with torch.no_grad():
      ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    out.append(ids[0, len(p):].tolist())
  config = getattr(model, "peft_config", {}).get("default", None)
  return {"answers": out, "base": getattr(config, "base_model_name_or_path", None)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=15)
  parser.add_argument("--prompts", type=int, default=8)
  args = parser.parse_args(argv)
  from jlora import models
  from jlora.core import optim, quant
  from jlora.interop import merged
  from jlora.models import hub
  from jlora.run import config, evaluate, trained as trained_lib
  from jlora.objectives import sft
  from jlora.data import render
  work = tempfile.mkdtemp(prefix="hub-interop-")
  run = os.path.join(work, "run")
  cfg = config.load("configs/quickstart.toml",
                    [f"run_dir='{run}'", f"train.steps={args.steps}",
                     f"eval.examples={args.prompts}"])
  print(f"# machine: {common.machine_line()}; quickstart with train.steps={args.steps}")
  sft.run(cfg, progress=False, log=lambda _: None)
  trained = trained_lib.load_trained(run)
  s = trained.setup
  # 1. The base under its Hub id in a cache built here (refs/main -> a snapshot).
  cache = os.path.join(work, "hub")
  repo = os.path.join(cache, "models--" + hub.SMOLLM2_ID.replace("/", "--"))
  rev = "0" * 40
  merged.save_merged(os.path.join(repo, "snapshots", rev), quant.dequantize_tree(s.frozen),
                     None, None, s.model_cfg, models.smollm2_gguf(), s.tok,
                     dtype=np.float32)
  os.makedirs(os.path.join(repo, "refs"))
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(rev)
  adapter = trained_lib.export_run(run, os.path.join(work, "adapter"))
  f32 = trained_lib.merge_run(run, os.path.join(work, "merged"))
  bf16 = trained_lib.merge_run(run, os.path.join(work, "merged-bf16"), dtype="bfloat16")
  # The trained run's own greedy answers, on the prompts as jlora renders them.
  _, records = evaluate.task_records(cfg)
  dcfg = evaluate.eval_data_config(cfg)
  prompts = [list(map(int, render.prompt_ids(r, s.tok, dcfg.fields, dcfg.chat, dcfg.system)))
             for r in records]
  params = optim.model_params(trained.trainable, s.frozen, s.plan)
  max_new = cfg.eval.max_new_tokens
  want = []
  for p in prompts:
    out = np.asarray(models.generate(s.model, params, np.asarray([p], np.int32),
                                     max_new_tokens=max_new))
    want.append(out[0].tolist())
  env = {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
  rows = {}
  for kind, path in (("peft", adapter), ("merged f32", f32), ("merged bf16", bf16)):
    try:
      got = common.call("bench.hub_interop", "torch_answers", env=env, kind=kind.split()[0],
                        path=path, max_new=max_new, prompts=prompts)
    except common.ChildFailed as e:
      print(f"{kind}: {e}")
      continue
    same = sum(g == w for g, w in zip(got["answers"], want))
    rows[kind] = same
    print(f"{kind:12s}: {same}/{len(want)} greedy answers token-identical to the trained run"
          + (f" (base found by id: {got['base']})" if got["base"] else ""))
    for g, w, r in zip(got["answers"], want, records):
      if g != w:
        print(f"  {r.get('prompt', '')!r}: jlora {s.tok.decode(w)!r}, {kind} {s.tok.decode(g)!r}")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
