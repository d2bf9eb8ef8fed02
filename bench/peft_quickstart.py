"""The quickstart as a PEFT user writes it: SmolLM2-135M-Instruct (transformers reads the
same GGUF, dequantised to f32), LoRA r=16 alpha=32 on the 7 projections, AdamW at the
quickstart's LR, the same packed batches (jlora's data pipeline, rows handed to torch),
held-out loss before and after, greedy answers to the held-out problems. For
``bench.process_memory``, which samples this process's RSS; it prints the same phase lines
as ``jlora train``.

    python -m bench.peft_quickstart [--steps 4] [--config configs/quickstart.toml]

Gradient checkpointing follows the config's ``model.remat`` (as jlora's run does). The
packed rows' documents attend to each other here (HF's eager/SDPA attention has no
segment mask): the same memory, slightly different arithmetic.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _torch_batch(batch: dict, torch):
  ids = torch.tensor(np.asarray(batch["inputs"]), dtype=torch.long)
  labels = torch.tensor(np.asarray(batch["targets"]), dtype=torch.long)
  labels[torch.tensor(np.asarray(batch["mask"])) == 0] = -100
  positions = batch.get("positions")
  return ids, labels, None if positions is None else torch.tensor(np.asarray(positions),
                                                                   dtype=torch.long)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--config", default="configs/quickstart.toml")
  parser.add_argument("--events", help="append the phases to this file (jlora.run.events)")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jlora's data pipeline only
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM
  from jlora import data, models
  from jlora.run import config, evaluate, events
  emit = events.JsonLines(args.events) if args.events else events.ignore
  torch.set_num_threads(os.cpu_count() or 2)
  cfg = config.load(args.config)
  path = models.resolve(cfg.model.path)
  tok = data.Tokenizer.from_model(path)
  train_batches = iter(data.dataset(cfg.data, tok))
  held_out = evaluate.eval_batches(cfg, tok)
  task, records = evaluate.task_records(cfg)
  emit(events.phase("load"))
  print("loading", path, flush=True)
  start = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                               gguf_file=os.path.basename(path),
                                               dtype=torch.float32)
  print(f"loaded in {time.perf_counter() - start:.1f} s", flush=True)
  emit(events.phase("set-up"))
  if cfg.model.remat:
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
  model = get_peft_model(model, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                           target_modules=TARGETS))
  lr = cfg.train.lr or 1.98e-3  # the quickstart's LR rule value
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                          weight_decay=0.0)

  def held_out_metrics() -> dict:
    model.eval()
    with torch.no_grad():
      total = count = 0.0
      for b in held_out:
        ids, labels, positions = _torch_batch(b, torch)
        logits = model(input_ids=ids, position_ids=positions).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 labels.flatten(), ignore_index=-100,
                                                 reduction="sum")
        total, count = total + float(loss), count + float((labels != -100).sum())
      right = 0
      if records:
        prompts = [data.prompt_ids(r, tok, cfg.data.fields, cfg.data.chat,
                                   cfg.data.system) for r in records]
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
          ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=cfg.eval.max_new_tokens,
                             pad_token_id=tok.eos_id)[:, width:]
        texts = [tok.decode(evaluate.until_eos(row.numpy(), tok.eos_id)) for row in out]
        right = sum(task.check(t, r["answer"]) for t, r in zip(texts, records))
    model.train()
    return {"eval_loss": total / max(count, 1.0),
            "accuracy": right / len(records) if records else None}

  emit(events.phase("evaluation"))
  print("evaluating before training", flush=True)
  before = held_out_metrics()
  print(f"before training: {before}", flush=True)
  emit(events.phase("steps"))  # eager: no compilation
  for step in range(args.steps):
    ids, labels, positions = _torch_batch(next(train_batches), torch)
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=positions).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                             ignore_index=-100)
    loss.backward()
    opt.step()
    print(f"step {step + 1} loss {float(loss):.4f}", flush=True)
  emit(events.phase("final evaluation"))
  print("evaluating after training", flush=True)
  after = held_out_metrics()
  emit(events.phase("finish"))
  print(f"done: {args.steps} steps, {before} -> {after}", flush=True)


if __name__ == "__main__":
  main()
