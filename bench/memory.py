"""Peak memory and step time of LoRA vs full fine-tuning on SmolLM2-135M (issue: trainer).

    python -m bench.memory [--steps 3]
    python -m bench.memory --only jlora-lora jlora-lora-bf16 jlora-lora-int8 jlora-lora-nf4 \
        jlora-lora-nf4all jlora-lora-nf4dq  # QLoRA: the base f32 / bf16 / int8 / nf4 / + double
    python -m bench.memory --model llama1b --steps 0 --only ...   # XLA's plan, no steps

Environment knobs for experiments (results in RESULTS.md): JLORA_BENCH_CHUNK=N (loss
chunk, default 256), JLORA_BENCH_JIT_CALL=1 (compile inside the first call instead of
ahead of it, as the trainer does).

Each configuration runs in its own process (peak RSS is per process: ru_maxrss), one after
another, on the SmolLM2-135M architecture (config from the GGUF; weights random-initialised
leaf by leaf, so the peak is training's, not the GGUF dequantisation's), batch 8 x 128,
LoRA r=16 alpha=32 on all 7 projections, AdamW, f32. jlora: layers rematerialised and the
cross-entropy chunked (256 tokens: the [B, T, 49152] logits are never held), the step
jitted with donated state. PEFT/torch on the same shapes for comparison. Reported: the
process's peak RSS (ru_maxrss: set-up included), the peak during the first step (which
compiles) and during the steady-state steps after it (VmHWM, reset through
/proc/self/clear_refs, after handing freed heap back with malloc_trim).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from bench import common

BATCH, SEQ, RANK = 8, 128, 16
CHUNK = int(os.environ.get("JLORA_BENCH_CHUNK", 256))
CONFIGS = ("jax-runtime", "jlora-lora", "jlora-full", "jlora-lora-bf16", "jlora-lora-plain",
           "jlora-lora-int8", "jlora-lora-nf4", "jlora-lora-nf4all", "jlora-lora-nf4dq",
           "peft-lora", "peft-full")
# Llama-3.2-1B's shapes (its config.json), for the QLoRA rows at a scale where the base
# dominates: 16 layers, d=2048, FFN 8192, 32/8 heads, vocab 128256, tied embeddings.
LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True,
                max_position_embeddings=131072)


def _measure(run, steps: int) -> dict:
  """Time ``run()`` (blocking) ``steps`` times after one compiling step; peak RSS of the
  first step and of the steady steps, each measured from a fresh VmHWM."""
  common.release_freed_heap()
  before = common.peak_rss_mb()
  common.reset_peak()
  run()
  first_step_peak = common.status_mb()["VmHWM"]
  common.release_freed_heap()  # the compiler's freed working memory
  common.reset_peak()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return {"ms_per_step": 1e3 * float(np.median(times)), "rss_before_steps_mb": before,
          "first_step_peak_mb": first_step_peak, "train_peak_mb": common.status_mb()["VmHWM"]}


def _model_config(name: str):
  from jlora import models
  from jlora.models import gguf_loader
  if name == "llama1b":
    return models.ModelConfig(**LLAMA_1B)
  cfg = gguf_loader.read_config(models.smollm2_gguf())
  gguf_loader.release()  # as the trainer does once the model is read
  return cfg


def _jlora(kind: str, steps: int, model_name: str = "smollm2") -> dict:
  import jax
  import jax.numpy as jnp
  import jlora
  from jlora import models
  from jlora.core import optim, quant
  from jlora.data import pipeline
  from jlora.infra import mesh as mesh_lib
  from jlora.objectives import lm
  from jlora.run import train_step
  plain = kind.endswith("plain")
  cfg = _model_config(model_name).replace(remat=not plain)
  model = models.Transformer(cfg)
  # Random weights leaf by leaf on the host (a jitted init would briefly hold the random
  # bits of every parameter too, and that peak is initialisation's, not training's), each
  # stored as the loader stores it (models.store: cast, or quantised for QLoRA).
  rng = np.random.default_rng(0)
  base_dtype = jnp.bfloat16 if kind.endswith("bf16") else jnp.float32  # the frozen base's
  fmt = kind.rsplit("-", 1)[-1] if kind.endswith(("int8", "nf4", "nf4all", "nf4dq")) else "none"
  double = fmt == "nf4dq"  # nf4 with its scales double-quantised (model.double_quant)
  fmt, embeddings = ("nf4", "nf4") if fmt == "nf4all" else ("nf4" if double else fmt, None)
  params = jlora.core.lora.unflatten({
      p: jax.tree.map(jnp.asarray, models.store(
          p, 0.02 * rng.standard_normal(shape, np.float32), base_dtype, fmt, embeddings, double))
      for p, shape in models.param_shapes(model).items()})
  if kind == "jlora-full":  # as `jlora train` with train.method = "full"
    plan, adapters = jlora.core.lora.plan(params, jlora.LoraSpec.full_fine_tuning()), {}
  else:
    plan = jlora.core.lora.plan(params, models.lora_spec(cfg, RANK))
    adapters = jax.jit(lambda p: jlora.init_adapters(p, plan, jax.random.PRNGKey(1)))(params)
  trainable, frozen = optim.trainable(params, adapters, plan)
  frozen_bytes = quant.stored_bytes(frozen)
  del params, adapters
  tx = optim.optimizer(1e-4)
  mesh = mesh_lib.make_mesh()
  loss = lm.lm_loss(model, plan, loss_chunk=None if plain else CHUNK)
  batch = pipeline.lm_batch(pipeline.random_tokens(cfg.vocab_size, BATCH, SEQ))
  # compiled ahead, as the trainer does, unless JLORA_BENCH_JIT_CALL (jit's first call)
  ahead = None if os.environ.get("JLORA_BENCH_JIT_CALL") else batch
  step, state = train_step.build(loss, tx, trainable, frozen, mesh, example_batch=ahead)
  del trainable
  if steps == 0:  # --steps 0: what XLA plans for the step, without running it
    m = step.memory_analysis()
    return {"ms_per_step": 0.0, "rss_before_steps_mb": common.peak_rss_mb(),
            "first_step_peak_mb": 0.0, "train_peak_mb": 0.0, "frozen_mb": frozen_bytes / 2**20,
            "xla_arguments_mb": m.argument_size_in_bytes / 2**20,
            "xla_temp_mb": m.temp_size_in_bytes / 2**20}
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], frozen, batch)
    jax.block_until_ready(metrics)

  return {**_measure(run, steps), "frozen_mb": frozen_bytes / 2**20}


def _peft(kind: str, steps: int) -> dict:
  from bench.train_step import peft_steps
  from jlora import models
  from jlora.models import gguf_loader
  cfg = gguf_loader.read_config(models.smollm2_gguf())
  kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  run, = peft_steps(kw, BATCH, SEQ + 1, which=(kind.split("-")[1],))
  return _measure(run, steps)


def _runtime(kind: str, steps: int) -> dict:
  """The fixed cost every jlora run pays: imports plus XLA:CPU's runtime once it has run a
  computation (thread pools, compiler), with no model."""
  del kind, steps
  import jax.numpy as jnp
  jnp.ones(8).sum().block_until_ready()
  common.release_freed_heap()
  rss = common.peak_rss_mb()
  return {"ms_per_step": 0.0, "rss_before_steps_mb": rss, "first_step_peak_mb": rss,
          "train_peak_mb": rss}


def child(kind: str, steps: int, model_name: str) -> dict:
  """One configuration, measured in this process (``main`` runs each in its own)."""
  if kind.startswith("jlora"):
    out = _jlora(kind, steps, model_name)
  else:
    out = (_runtime if kind == "jax-runtime" else _peft)(kind, steps)
  return {**out, **(common.device_memory_mb() or {}), "kind": kind,
          "peak_rss_mb": common.peak_rss_mb()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--only", nargs="*", choices=CONFIGS, default=list(CONFIGS))
  parser.add_argument("--model", choices=("smollm2", "llama1b"), default="smollm2")
  args = parser.parse_args(argv)
  print(f"# machine: {common.machine_line(common.machine(devices=False))}; {args.model} "
        f"shapes, batch {BATCH} x {SEQ}, r={RANK}; JAX on the CPU")
  results = {}
  for kind in args.only:
    try:
      r = results[kind] = common.call("bench.memory", "child", env=common.CPU, kind=kind,
                                      steps=args.steps, model_name=args.model)
    except common.ChildFailed as e:
      print(f"{kind}: {e}")
      continue
    print(f"{kind:18s} peak RSS: process {r['peak_rss_mb']:6.0f} MB, first step "
          f"{r['first_step_peak_mb']:6.0f} MB, steady steps {r['train_peak_mb']:6.0f} MB; "
          f"{r['ms_per_step']:7.0f} ms/step" +
          (f"; frozen base {r['frozen_mb']:6.0f} MB" if "frozen_mb" in r else "") +
          (f"; XLA plan: arguments {r['xla_arguments_mb']:6.0f} MB, temporaries "
           f"{r['xla_temp_mb']:6.0f} MB" if "xla_temp_mb" in r else ""))
  for a, b in (("jlora-lora", "jlora-full"), ("peft-lora", "peft-full")):
    if a in results and b in results:
      ra, rb = results[a], results[b]
      print(f"peak RSS {a} / {b}: process {ra['peak_rss_mb'] / rb['peak_rss_mb']:.3f}, "
            f"first step {ra['first_step_peak_mb'] / rb['first_step_peak_mb']:.3f}, "
            f"steady steps {ra['train_peak_mb'] / rb['train_peak_mb']:.3f}"
            + (" (target <= 0.45)" if a == "jlora-lora" else ""))
  _quant_ratios(results)
  if "jlora-lora" in results and "peft-lora" in results:
    print(f"ms/step jlora LoRA / PEFT LoRA: "
          f"{results['jlora-lora']['ms_per_step'] / results['peft-lora']['ms_per_step']:.2f}")


def _xla_mb(r: dict) -> float:
  return r["xla_arguments_mb"] + r["xla_temp_mb"]


def _quant_ratios(results: dict) -> None:
  """QLoRA's targets: nf4 frozen bytes <= 0.3x and peak RSS <= 0.7x the bf16 base's; step
  time against the f32 base (the dequantisation's cost)."""
  bf16, f32 = results.get("jlora-lora-bf16"), results.get("jlora-lora")
  for fmt in ("int8", "nf4", "nf4all", "nf4dq"):
    r = results.get(f"jlora-lora-{fmt}")
    if r is None:
      continue
    nf4 = fmt.startswith("nf4")
    if bf16 and "xla_temp_mb" in r:  # --steps 0: XLA's plan only
      print(f"{fmt} / bf16 base: frozen bytes {r['frozen_mb'] / bf16['frozen_mb']:.3f}, "
            f"XLA arguments + temporaries {_xla_mb(r) / _xla_mb(bf16):.3f}")
    elif bf16:
      print(f"{fmt} / bf16 base: frozen bytes {r['frozen_mb'] / bf16['frozen_mb']:.3f}"
            + (" (target <= 0.3)" if nf4 else "") +
            f", process peak RSS {r['peak_rss_mb'] / bf16['peak_rss_mb']:.3f}"
            + (" (target <= 0.7)" if nf4 else "") +
            f", steady-step peak {r['train_peak_mb'] / bf16['train_peak_mb']:.3f}")
    if f32 and f32["ms_per_step"]:
      print(f"{fmt} / f32 base: ms/step {r['ms_per_step'] / f32['ms_per_step']:.2f}")


if __name__ == "__main__":
  main()
