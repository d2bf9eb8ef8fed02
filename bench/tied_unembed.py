"""A quantised tied unembedding read a vocabulary block at a time, against the whole table
dequantised to f32 each step (issue 39, QLoRA leftovers).

    python -m bench.tied_unembed [--rows 4 --seq 128 --repeats 5]

SmolLM2-135M-Instruct with ``model.quantize = "nf4"`` (its tied table int8, the default
under nf4), LoRA r=16 on all layers, the SFT loss chunked over 256 tokens (``train.
loss_chunk``'s default) and its gradient, jitted. Side by side in one process: jlora's
``target_logprobs`` (``VOCAB_BLOCK`` rows dequantised at a time) and the previous path
(the logits against the whole table in f32, ``Transformer.logits``). Reported: XLA's
memory analysis of each compiled program (temporaries), the median step time, and the
losses (equal to float rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common


def _previous(model, params, h, targets):
  """The unembedding before: the whole (dequantised) table's logits, then the log-softmax."""
  logits = model.apply({"params": params}, h, method="logits")
  return -optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  from jlora import models
  from jlora.core import lora, optim
  from jlora.objectives import lm
  model, params, cfg = models.load(models.smollm2_gguf(), quantize="nf4")
  spec = models.lora_spec(cfg, 16)
  plan = lora.plan(params, spec)
  trainable, frozen = optim.trainable(params, lora.init_adapters(params, plan,
                                                                 jax.random.PRNGKey(0)), plan)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (args.rows, args.seq + 1))
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
           "mask": jnp.ones((args.rows, args.seq), jnp.float32)}
  blocked = lm._unembedded
  result = {"date": time.strftime("%Y-%m-%d"), "machine": common.machine(devices=False),
            "settings": {**vars(args), "vocab": cfg.vocab_size, "hidden": cfg.hidden_size,
                         "table": type(params["embed"]["embedding"]).__name__,
                         "table_bytes": int(params["embed"]["embedding"].nbytes)}}
  for name, unembed in (("vocabulary blocks", blocked), ("whole table", _previous)):
    lm._unembedded = unembed
    loss_fn = lm.lm_loss(model, plan, loss_chunk=256)
    step = jax.jit(jax.value_and_grad(lambda tr: (lambda s, c: s / c)(
        *loss_fn(tr, frozen, batch))))
    compiled = step.lower(trainable).compile()
    memory = compiled.memory_analysis()
    loss, _ = jax.block_until_ready(compiled(trainable))
    times = []
    for _ in range(args.repeats):
      begin = time.perf_counter()
      jax.block_until_ready(compiled(trainable))
      times.append(time.perf_counter() - begin)
    result[name] = {"loss": float(loss), "temp_bytes": int(memory.temp_size_in_bytes),
                    "step_s": statistics.median(times)}
  lm._unembedded = blocked
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
