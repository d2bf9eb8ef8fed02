"""Training-step time: jlora LoRA vs jlora full fine-tuning, and the same model in PEFT/torch
and in Flax NNX with ``nnx.LoRALinear``, measured in one run.

    python -m bench.train_step [--repeats 10] [--skip-peers]

Tiny Llama: d=256, 4 layers, 4 heads, FFN 1024, vocab 512, tied embeddings, batch 16 x 128,
LoRA r=16 alpha=32 on all 7 projections, AdamW; plus the jlora pair at the SmolLM2-135M
layer shape (d=576, FFN 1536, 9 heads / 3 KV heads, 4 layers, batch 8 x 128).
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import jlora
from bench.common import block, machine, median_ms
from jlora import models, optim
from jlora.models import ModelConfig, Transformer

TINY = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=1024,
            num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64, tie_embeddings=True,
            rope_theta=10000.0)
SMOL = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
            num_layers=4, num_heads=9, num_kv_heads=3, head_dim=64, tie_embeddings=True,
            rope_theta=100000.0)
RANK, ALPHA, LR = 16, 32.0, 1e-4


def _batch(cfg, batch, seq, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32)


def _xent(model, params, tokens):
  logits, _ = model.apply({"params": params}, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def jlora_steps(cfg: ModelConfig, batch: int, seq: int, dtype=jnp.float32, count_flops=True):
  """(lora step, full step) closures that run one jitted step each, and their FLOPs.

  ``dtype`` is the compute dtype; the frozen base of the LoRA run is stored in it too,
  while full fine-tuning keeps f32 master weights (the usual mixed-precision setup)."""
  model = Transformer(cfg, dtype=dtype)
  tokens = _batch(cfg, batch, seq)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens[:, :-1]))["params"]
  full_params = jax.tree_util.tree_map(jnp.copy, params)
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  spec = models.lora_spec(cfg, RANK, alpha=ALPHA)
  adapters = jlora.init_adapters(params, spec, jax.random.PRNGKey(1))

  def lora_loss(trainable, frozen, tokens):
    p = jlora.lora.with_adapters(optim.combine(trainable["full"], frozen),
                                 trainable["lora"], spec)
    return _xent(model, p, tokens)

  tx = optim.optimizer(LR)
  trainable, frozen = optim.trainable(params, adapters, spec)
  lora_step = jax.jit(optim.step_fn(lora_loss, tx), donate_argnums=(0, 1))
  lora_state = [trainable, tx.init(trainable)]

  full_tx = optax.adamw(LR, weight_decay=0.0)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def full_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda p: _xent(model, p, tokens))(params)
    updates, opt_state = full_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  full_state = [full_params, full_tx.init(full_params)]

  def run_lora():
    lora_state[0], lora_state[1], loss = lora_step(lora_state[0], lora_state[1], frozen, tokens)
    block(loss)

  def run_full():
    full_state[0], full_state[1], loss = full_step(full_state[0], full_state[1], tokens)
    block(loss)

  lora_flops, full_flops = xla_flops(cfg, batch, seq) if count_flops else (None, None)
  return run_lora, run_full, lora_flops, full_flops


def model_flops(cfg: ModelConfig, tokens: int, seq: int, lora: bool) -> float:
  """Analytic training FLOPs per step: 2 per matmul parameter per token forward (plus
  causal attention scores and values), backward twice that for full FT; LoRA skips the
  frozen weight gradients (FINDINGS 7: ~2/3 of full)."""
  d, L = cfg.hidden_size, cfg.num_layers
  attn = cfg.hidden_size * cfg.num_heads * cfg.head_dim * 2 + \
      cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim * 2
  mlp = 3 * d * cfg.intermediate_size
  fwd = 2 * tokens * (L * (attn + mlp) + d * cfg.vocab_size) + 4 * tokens * seq * L * \
      cfg.num_heads * cfg.head_dim
  return fwd * (2 if lora else 3)


GPU_SHAPES = {  # (config, batch, seq): real model sizes for an accelerator. remat: XLA's
    # attention keeps each layer's [B, heads, T, T] probabilities for the backward otherwise.
    "smollm2-135m": (dict(SMOL, num_layers=30, remat=True), 8, 2048),
    "llama3.2-1b": (dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_layers=16, num_heads=32,
                         num_kv_heads=8, head_dim=64, tie_embeddings=True,
                         rope_theta=500000.0, remat=True), 8, 2048),
}


def gpu_main(repeats: int, peak_tflops: float):
  print(f"# train_step (accelerator) on {machine()}, bf16 compute, LoRA r={RANK} all layers")
  print(f"{'model':<14} {'what':<10} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
  for name, (kw, batch, seq) in GPU_SHAPES.items():
    cfg = ModelConfig(**kw)
    run_lora, run_full, _, _ = jlora_steps(cfg, batch, seq, jnp.bfloat16, count_flops=False)
    times = {}
    for what, run in (("LoRA", run_lora), ("full FT", run_full)):
      ms = median_ms(run, repeats)
      tflops = model_flops(cfg, batch * seq, seq, what == "LoRA") / ms / 1e9
      times[what] = ms
      print(f"{name:<14} {what:<10} {ms:9.1f} {batch * seq / ms * 1e3:10.0f} {tflops:8.1f} "
            f"{tflops / peak_tflops:6.1%}")
    print(f"{name:<14} LoRA/full time {times['LoRA'] / times['full FT']:.3f}")


def xla_flops(cfg: ModelConfig, batch: int, seq: int) -> tuple[float, float]:
  """XLA's FLOP count of the LoRA and full gradient computations. Counted on an unrolled
  twin of the model: XLA's cost analysis counts a while-loop (scan) body once."""
  model = Transformer(cfg.replace(unroll_layers=True))
  tokens = _batch(cfg, batch, seq)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens[:, :-1]))["params"]
  spec = models.lora_spec(cfg, RANK, alpha=ALPHA)
  adapters = jax.eval_shape(lambda: jlora.init_adapters(params, spec, jax.random.PRNGKey(1)))
  count = lambda f, *a: jax.jit(f).lower(*a).compile().cost_analysis()["flops"]
  lora = count(jax.grad(lambda a, p: _xent(model, jlora.lora.with_adapters(p, a, spec),
                                          tokens)), adapters, params)
  full = count(jax.grad(lambda p: _xent(model, p, tokens)), params)
  return lora, full


def peft_steps(cfg_kw: dict, batch: int, seq: int, which=("lora", "full")):
  """PEFT/torch LoRA and full steps on the same model and batch (None if not installed);
  ``which`` picks the ones to build (each holds its own model)."""
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
  tokens = torch.tensor(np.asarray(_batch(models.ModelConfig(**cfg_kw), batch, seq)),
                        dtype=torch.long)

  def make(lora: bool):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(hf_cfg)
    if lora:
      model = get_peft_model(model, LoraConfig(
          r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                            weight_decay=0.0)

    def step():
      opt.zero_grad(set_to_none=True)
      loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
      loss.backward()
      opt.step()
    return step

  return tuple(make(kind == "lora") for kind in which)


def nnx_lora_step(cfg_kw: dict, batch: int, seq: int):
  """The tiny Llama written in Flax NNX with nnx.LoRALinear projections."""
  from bench.nnx_llama import lora_train_step
  return lora_train_step(cfg_kw, batch, seq, RANK, ALPHA, LR)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--skip-peers", action="store_true")
  parser.add_argument("--gpu", action="store_true", help="real model shapes, bf16")
  parser.add_argument("--peak-tflops", type=float, default=989.0,
                      help="dense bf16 peak for MFU (H100 SXM: 989)")
  args = parser.parse_args(argv)
  if args.gpu:
    return gpu_main(args.repeats, args.peak_tflops)
  print(f"# train_step on {machine()}")
  rows = []
  tiny_tokens = 16 * 128
  run_lora, run_full, lf, ff = jlora_steps(ModelConfig(**TINY), 16, 128)
  t_lora, t_full = median_ms(run_lora, args.repeats), median_ms(run_full, args.repeats)
  rows.append(("tiny", "jlora LoRA", t_lora, tiny_tokens, lf))
  rows.append(("tiny", "jlora full FT", t_full, tiny_tokens, ff))
  if not args.skip_peers:
    peft = peft_steps(TINY, 16, 128)
    if peft:
      rows.append(("tiny", "PEFT LoRA", median_ms(peft[0], args.repeats), tiny_tokens, None))
      rows.append(("tiny", "PEFT full FT", median_ms(peft[1], args.repeats), tiny_tokens, None))
    rows.append(("tiny", "NNX LoRALinear", median_ms(nnx_lora_step(TINY, 16, 128),
                                                     args.repeats), tiny_tokens, None))
  smol_tokens = 8 * 128
  run_lora, run_full, lf, ff = jlora_steps(ModelConfig(**SMOL), 8, 128)
  rows.append(("smol", "jlora LoRA", median_ms(run_lora, args.repeats), smol_tokens, lf))
  rows.append(("smol", "jlora full FT", median_ms(run_full, args.repeats), smol_tokens, ff))

  print(f"{'config':<6} {'what':<16} {'ms/step':>9} {'tokens/s':>10} {'GFLOP':>8}")
  for cfg, what, ms, tokens, flops in rows:
    gf = f"{flops / 1e9:8.1f}" if flops else f"{'':>8}"
    print(f"{cfg:<6} {what:<16} {ms:9.1f} {tokens / ms * 1e3:10.0f} {gf}")
  by = {(c, w): ms for c, w, ms, *_ in rows}
  flops = {(c, w): f for c, w, _, _, f in rows}
  for c in ("tiny", "smol"):
    print(f"{c}: LoRA/full time {by[c, 'jlora LoRA'] / by[c, 'jlora full FT']:.3f}, "
          f"FLOPs {flops[c, 'jlora LoRA'] / flops[c, 'jlora full FT']:.3f}")
  for peer in ("PEFT LoRA", "NNX LoRALinear"):
    if ("tiny", peer) in by:
      print(f"tiny: jlora LoRA tokens/s / {peer} = {by['tiny', peer] / by['tiny', 'jlora LoRA']:.2f}")


if __name__ == "__main__":
  main()
