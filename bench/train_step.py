"""Training-step time: jlora LoRA vs jlora full fine-tuning, and the same model in PEFT/torch
and in Flax NNX with ``nnx.LoRALinear``, measured in one run.

    python -m bench.train_step [--repeats 10] [--skip-peers] [--loss-chunk 256] [--smoke]

The jlora rows time the step ``jlora train`` runs, from the one step builder
(``jlora.run.train_step.build``): ``lm.lm_loss`` with the trainer's chunked cross-entropy
(``--loss-chunk``, default 256 like ``train.loss_chunk``; 0 for the plain unchunked loss),
jitted with donated state and compiled ahead of its first call. Full fine-tuning goes
through the same step with ``LoraSpec.full_fine_tuning()``, as ``jlora train`` with
``train.method = "full"`` does.

Tiny Llama: d=256, 4 layers, 4 heads, FFN 1024, vocab 512, tied embeddings, batch 16 x 128,
LoRA r=16 alpha=32 on all 7 projections, AdamW; plus the jlora pair at the SmolLM2-135M
layer shape (d=576, FFN 1536, 9 heads / 3 KV heads, 4 layers, batch 8 x 128).
``--smoke``: the same code at toy shapes, one repeat (checks that it runs; times nothing).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
from flax import linen as nn

import jlora
from bench.common import block, machine, machine_line, median_ms
from jlora import models
from jlora.core import lora, optim
from jlora.data import pipeline
from jlora.objectives import lm
from jlora.run import config, train_step as train_step_lib
from jlora.models import ModelConfig, Transformer
from jlora.study import compute

TINY = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=1024,
            num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64, tie_embeddings=True,
            rope_theta=10000.0)
SMOL = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
            num_layers=4, num_heads=9, num_kv_heads=3, head_dim=64, tie_embeddings=True,
            rope_theta=100000.0)
RANK, ALPHA, LR = 16, 32.0, 1e-4
LOSS_CHUNK = config.TrainSection().loss_chunk  # what `jlora train` runs by default
FULL_SPEC = lora.LoraSpec.full_fine_tuning()  # `train.method = "full"`


def _trainer_step(model, plan, trainable, frozen, batch, loss_chunk):
  """A closure running one step of ``jlora train``'s kind: ``train_step_lib.build``'s
  jitted, donated, ahead-compiled step over ``lm.lm_loss``."""
  tx = optim.optimizer(LR)
  step, state = train_step_lib.build(lm.lm_loss(model, plan, loss_chunk), tx, trainable,
                                     frozen, example_batch=batch)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], frozen, batch)
    block(metrics)
  return run


def jlora_steps(cfg: ModelConfig, batch: int, seq: int, dtype=jnp.float32, count_flops=True,
                loss_chunk: int | None = LOSS_CHUNK):
  """(lora step, full step) closures that run one trainer step each, and their FLOPs.

  ``dtype`` is the compute dtype; the frozen base of the LoRA run is stored in it too,
  while full fine-tuning keeps f32 master weights (the usual mixed-precision setup)."""
  model = Transformer(cfg, dtype=dtype)
  tokens = pipeline.random_tokens(cfg.vocab_size, batch, seq)
  lm_batch = jax.device_put(pipeline.lm_batch(tokens), jax.devices()[0])
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens[:, :-1]))["params"]
  full_params = jax.tree_util.tree_map(jnp.copy, params)
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)

  plan = lora.plan(params, models.lora_spec(cfg, RANK, alpha=ALPHA))
  adapters = jlora.init_adapters(params, plan, jax.random.PRNGKey(1))
  trainable, frozen = optim.trainable(params, adapters, plan)
  run_lora = _trainer_step(model, plan, trainable, frozen, lm_batch, loss_chunk)

  full_plan = lora.plan(full_params, FULL_SPEC)
  trainable, frozen = optim.trainable(full_params, {}, full_plan)
  run_full = _trainer_step(model, full_plan, trainable, frozen, lm_batch, loss_chunk)

  lora_flops, full_flops = xla_flops(cfg, batch, seq) if count_flops else (None, None)
  return run_lora, run_full, lora_flops, full_flops


def model_flops(cfg: ModelConfig, tokens: int, seq: int, lora: bool) -> float:
  """Analytic training FLOPs per step, for MFU.

  Matmuls: 2 FLOPs per weight and token forward; backward 4 for full FT (input and weight
  gradients), 2 for LoRA (input gradients only: the frozen weights get none; the rank-r
  adapters' own FLOPs are left out). Attention scores (Q K^T) and values (P V): causal
  attention counts half of T x T, i.e. 2 x T/2 x head_dim FLOPs per token, query head and
  product (the lower triangle a causal kernel computes), and its backward is twice its
  forward for both methods (attention has no weights).
  """
  d, L = cfg.hidden_size, cfg.num_layers
  attn = cfg.hidden_size * cfg.num_heads * cfg.head_dim * 2 + \
      cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim * 2
  mlp = 3 * d * cfg.intermediate_size
  matmul_fwd = 2 * tokens * (L * (attn + mlp) + d * cfg.vocab_size)
  causal_fwd = 2 * 2 * tokens * (seq / 2) * L * cfg.num_heads * cfg.head_dim  # QK^T and PV
  return matmul_fwd * (2 if lora else 3) + causal_fwd * 3


GPU_SHAPES = {  # (config, batch, seq): real model sizes for an accelerator. remat: XLA's
    # attention keeps each layer's [B, heads, T, T] probabilities for the backward otherwise.
    "smollm2-135m": (dict(SMOL, num_layers=30, remat=True), 8, 2048),
    "llama3.2-1b": (dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_layers=16, num_heads=32,
                         num_kv_heads=8, head_dim=64, tie_embeddings=True,
                         rope_theta=500000.0, remat=True), 8, 2048),
}
SMOKE_SHAPES = {"tiny": (dict(TINY, num_layers=2, remat=True), 2, 32)}


def gpu_main(repeats: int, peak_tflops: float, loss_chunk: int | None, shapes=GPU_SHAPES,
             who: str = "jlora", profile: str | None = None, json_path: str | None = None):
  """The accelerator rows: ``who`` = "jlora" (its LoRA and full steps; ``profile``: a
  ``jax.profiler`` trace of the slowest LoRA step) or "peft" (PEFT/torch on the same shapes,
  run in a process of its own so that JAX's memory pool is not competing with torch's)."""
  print(f"# train_step (accelerator) on {machine_line()}, bf16 compute, LoRA r={RANK} all "
        f"layers, loss_chunk={loss_chunk}, {who}")
  print(f"{'model':<14} {'what':<12} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
  rows, slowest = [], None
  for name, (kw, batch, seq) in shapes.items():
    cfg = ModelConfig(**kw)
    if who == "peft":
      import torch
      device = "cuda" if torch.cuda.is_available() else "cpu"
      steps = peft_steps(kw, batch, seq, device=device)
      if steps is None:
        raise SystemExit("PEFT rows need torch, transformers and peft")
      runs = (("PEFT LoRA", steps[0]), ("PEFT full FT", steps[1]))
    else:
      run_lora, run_full, _, _ = jlora_steps(cfg, batch, seq, jnp.bfloat16, count_flops=False,
                                             loss_chunk=loss_chunk)
      runs = (("LoRA", run_lora), ("full FT", run_full))
    times = {}
    for what, run in runs:
      ms = median_ms(run, repeats)
      tflops = model_flops(cfg, batch * seq, seq, "LoRA" in what) / ms / 1e9
      times[what] = ms
      rows.append({"model": name, "what": what, "ms": ms, "tokens_per_s": batch * seq / ms * 1e3,
                   "tflops": tflops, "mfu": tflops / peak_tflops, "batch": batch, "seq": seq})
      print(f"{name:<14} {what:<12} {ms:9.1f} {batch * seq / ms * 1e3:10.0f} {tflops:8.1f} "
            f"{tflops / peak_tflops:6.1%}")
      if what == "LoRA" and (slowest is None or ms > slowest[0]):
        slowest = (ms, name, run)
    lora_ms, full_ms = (times[k] for k in times)
    print(f"{name:<14} LoRA/full time {lora_ms / full_ms:.3f}")
    del runs
  if profile and slowest:
    # a trace of 3 steps (TensorBoard's profile plugin or Perfetto read it)
    with jax.profiler.trace(profile, create_perfetto_trace=True):
      for _ in range(3):
        slowest[2]()
    print(f"profile of {slowest[1]} LoRA ({slowest[0]:.1f} ms/step) in {profile}")
  if json_path:
    with open(json_path, "w") as f:
      json.dump({"machine": machine(), "loss_chunk": loss_chunk, "rows": rows}, f, indent=1)


def xla_flops(cfg: ModelConfig, batch: int, seq: int) -> tuple[float, float]:
  """XLA's FLOP count of the LoRA and full gradient computations (``compute.xla_flops``)."""
  return compute.xla_flops(cfg, batch, seq, rank=RANK, alpha=ALPHA)


def peft_steps(cfg_kw: dict, batch: int, seq: int, which=("lora", "full"), device: str = "cpu"):
  """PEFT/torch LoRA and full steps on the same model and batch (None if not installed);
  ``which`` picks the ones to build (each holds its own model).

  On "cuda", the accelerator setup a PEFT user runs, matched to jlora's ``--gpu`` rows: SDPA
  attention, bf16 autocast; the LoRA base stored in bf16 (PEFT keeps its adapters in f32),
  full fine-tuning with f32 master weights; each step ends with a device sync."""
  try:
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 2)
  hf_cfg = tf.LlamaConfig(vocab_size=cfg_kw["vocab_size"], hidden_size=cfg_kw["hidden_size"],
                          intermediate_size=cfg_kw["intermediate_size"],
                          num_hidden_layers=cfg_kw["num_layers"],
                          num_attention_heads=cfg_kw["num_heads"],
                          num_key_value_heads=cfg_kw["num_kv_heads"],
                          tie_word_embeddings=cfg_kw["tie_embeddings"],
                          attn_implementation="sdpa")
  tokens = torch.tensor(pipeline.random_tokens(cfg_kw["vocab_size"], batch, seq),
                        dtype=torch.long, device=device)
  cuda = device.startswith("cuda")

  def make(lora: bool):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(hf_cfg).to(device)
    if lora and cuda:
      model = model.to(torch.bfloat16)
    if lora:
      model = get_peft_model(model, LoraConfig(
          r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                            weight_decay=0.0)

    def step():
      opt.zero_grad(set_to_none=True)
      with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=cuda):
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
      loss.backward()
      opt.step()
      if cuda:
        torch.cuda.synchronize()
    return step

  return tuple(make(kind == "lora") for kind in which)


def nnx_lora_step(cfg_kw: dict, batch: int, seq: int):
  """The tiny Llama written in Flax NNX with nnx.LoRALinear projections."""
  from bench.nnx_llama import lora_train_step
  return lora_train_step(cfg_kw, batch, seq, RANK, ALPHA, LR)


CPU_SHAPES = {"tiny": (TINY, 16, 128), "smol": (SMOL, 8, 128)}  # (config, batch, seq)
CPU_SMOKE_SHAPES = {"tiny": (dict(TINY, num_layers=2), 2, 32),
                    "smol": (dict(SMOL, num_layers=1), 2, 32)}


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--skip-peers", action="store_true")
  parser.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK,
                      help="tokens per cross-entropy chunk (as train.loss_chunk); 0: plain loss")
  parser.add_argument("--smoke", action="store_true",
                      help="toy shapes and one repeat: checks the bench runs, times nothing")
  parser.add_argument("--gpu", action="store_true", help="real model shapes, bf16")
  parser.add_argument("--peak-tflops", type=float, default=989.0,
                      help="dense bf16 peak for MFU (H100 SXM and H200: 989)")
  parser.add_argument("--who", choices=("jlora", "peft"), default="jlora",
                      help="--gpu: jlora's steps, or PEFT/torch's on the same shapes")
  parser.add_argument("--profile", help="--gpu: write a trace of the slowest LoRA step here")
  parser.add_argument("--json", help="--gpu: also write the rows to this file")
  args = parser.parse_args(argv)
  chunk = args.loss_chunk or None
  repeats = 1 if args.smoke else args.repeats
  if args.gpu:
    return gpu_main(repeats, args.peak_tflops, chunk, SMOKE_SHAPES if args.smoke else GPU_SHAPES,
                    args.who, args.profile, args.json)
  shapes = CPU_SMOKE_SHAPES if args.smoke else CPU_SHAPES
  print(f"# train_step on {machine_line()}; jlora: the trainer's step, loss_chunk={chunk}")
  rows = []
  for name, (kw, batch, seq) in shapes.items():
    tokens = batch * seq
    run_lora, run_full, lf, ff = jlora_steps(ModelConfig(**kw), batch, seq, loss_chunk=chunk)
    rows.append((name, "jlora LoRA", median_ms(run_lora, repeats), tokens, lf))
    rows.append((name, "jlora full FT", median_ms(run_full, repeats), tokens, ff))
    if name == "tiny" and not args.skip_peers:
      peft = peft_steps(kw, batch, seq)
      if peft:
        rows.append((name, "PEFT LoRA", median_ms(peft[0], repeats), tokens, None))
        rows.append((name, "PEFT full FT", median_ms(peft[1], repeats), tokens, None))
      rows.append((name, "NNX LoRALinear", median_ms(nnx_lora_step(kw, batch, seq), repeats),
                   tokens, None))

  print(f"{'config':<6} {'what':<16} {'ms/step':>9} {'tokens/s':>10} {'GFLOP':>8}")
  for cfg, what, ms, tokens, flops in rows:
    gf = f"{flops / 1e9:8.1f}" if flops else f"{'':>8}"
    print(f"{cfg:<6} {what:<16} {ms:9.1f} {tokens / ms * 1e3:10.0f} {gf}")
  by = {(c, w): ms for c, w, ms, *_ in rows}
  flops = {(c, w): f for c, w, _, _, f in rows}
  for c in shapes:
    print(f"{c}: LoRA/full time {by[c, 'jlora LoRA'] / by[c, 'jlora full FT']:.3f}, "
          f"FLOPs {flops[c, 'jlora LoRA'] / flops[c, 'jlora full FT']:.3f}")
  for peer in ("PEFT LoRA", "NNX LoRALinear"):
    if ("tiny", peer) in by:
      ratio = by["tiny", peer] / by["tiny", "jlora LoRA"]
      print(f"tiny: jlora LoRA tokens/s / {peer} = {ratio:.2f}")


if __name__ == "__main__":
  main()
