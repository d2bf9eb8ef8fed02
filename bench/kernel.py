"""The fused LoRA matmul vs its XLA reference vs the base matmul alone (issue: kernel).

    python -m bench.kernel [--repeats 20] [--record]      # on a GPU or TPU
    python -m bench.kernel --smoke                        # CPU: tiny shapes, interpreted
    python -m bench.kernel --ms 2048,8192 --ranks 16,64 --json k.json   # bench/gpu_suite.sh

For M in {16, 2048, 8192}, K = N = 4096, r in {16, 64, 256}, bf16, it times (median over
repeats, after warm-up, each jitted and blocked on):
- base: ``x @ W`` alone (forward), and forward + dx (W frozen: no dW);
- ref: ``jlora.kernels.lora_matmul(impl="xla")``: y = x W + s (x A) B as XLA matmuls
  through the kernels' custom VJP, forward and forward + backward (dx, dA, dB);
- fused: the same with ``impl="pallas"``: the Pallas kernels for this backend.
It prints each shape's roofline floor (max of FLOPs / peak and bytes / bandwidth, for the
device's published bf16 peak and HBM bandwidth), the ratios the issue asks for (fused
fwd+bwd vs ref: target >= 1.15x at M=8192, r=16; fused vs base: within 1.1x), and with
``--record`` appends the table to bench/RESULTS.md. If fused fwd+bwd beats ref on every
M >= 2048 shape, add the backend to ``jlora.kernels.FASTER_ON`` so "auto" picks it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import machine, machine_line, median_ms
from jlora import kernels

# Published dense bf16 peak (FLOP/s) and HBM bandwidth (byte/s) by device kind substring.
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12),
         "TPU v5 lite": (197e12, 0.82e12), "TPU v5p": (459e12, 2.76e12),
         "TPU v4": (275e12, 1.2e12), "TPU v6": (918e12, 1.64e12)}
SCALE = 2.0


def peaks(kind: str) -> tuple[float, float] | None:
  return next((v for k, v in PEAKS.items() if k in kind), None)


def roofline_us(m, k, n, r, itemsize, kind: str, backward: bool) -> float | None:
  """Lower bound on time: FLOPs at peak vs the bytes that must move at HBM bandwidth."""
  p = peaks(kind)
  if p is None:
    return None
  flops = 2 * m * k * n + 2 * m * k * r + 2 * m * r * n
  moved = itemsize * (m * k + k * n + m * n) + 4 * m * r
  if backward:  # dx = dY W^T + dS A^T, dS = s dY B^T, dA = x^T dS, dB = s t^T dY
    flops += 2 * m * n * k + 2 * m * r * k + 2 * m * n * r + 2 * m * k * r + 2 * m * r * n
    moved += itemsize * (m * n + k * n + 2 * m * k) + 4 * m * r
  return 1e6 * max(flops / p[0], moved / p[1])


def _fns(impl: str | None, w, a, b):
  """(forward, forward + backward) jitted functions of x for one implementation."""
  if impl is None:  # the base matmul alone
    fwd = lambda x: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  else:
    fwd = lambda x, a=a, b=b: kernels.lora_matmul(x, w, a, b, SCALE, impl=impl)

  def fwd_bwd(x):
    if impl is None:
      y, vjp = jax.vjp(fwd, x)
    else:
      y, vjp = jax.vjp(lambda x, a, b: kernels.lora_matmul(x, w, a, b, SCALE, impl=impl),
                       x, a, b)
    return vjp(y)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def run(ms, k, n, ranks, dtype, impl_fused: str, repeats: int) -> list[dict]:
  kind = jax.devices()[0].device_kind
  rows = []
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
  for m in ms:
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    base = _fns(None, w, None, None)
    base_t = [median_ms(lambda f=f: jax.block_until_ready(f(x)), repeats) for f in base]
    for r in ranks:
      a = jnp.asarray(rng.standard_normal((k, r)) / np.sqrt(k), dtype)
      b = jnp.asarray(rng.standard_normal((r, n)) / np.sqrt(r), dtype)
      row = {"M": m, "r": r, "base_fwd": base_t[0], "base_fb": base_t[1]}
      for name, impl in (("ref", "xla"), ("fused", impl_fused)):
        f, fb = _fns(impl, w, a, b)
        row[f"{name}_fwd"] = median_ms(lambda: jax.block_until_ready(f(x)), repeats)
        row[f"{name}_fb"] = median_ms(lambda: jax.block_until_ready(fb(x)), repeats)
      itemsize = jnp.dtype(dtype).itemsize
      row["floor_fwd_us"] = roofline_us(m, k, n, r, itemsize, kind, False)
      row["floor_fb_us"] = roofline_us(m, k, n, r, itemsize, kind, True)
      rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  us = lambda v: "" if v is None else f"{v:.0f}"
  lines = ["| M | r | base fwd | ref fwd | fused fwd | floor fwd | base f+b | ref f+b | "
           "fused f+b | floor f+b | ref/fused f+b | fused/base f+b |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for w in rows:
    lines.append(
        f"| {w['M']} | {w['r']} | {1e3 * w['base_fwd']:.0f} | {1e3 * w['ref_fwd']:.0f} | "
        f"{1e3 * w['fused_fwd']:.0f} | {us(w['floor_fwd_us'])} | {1e3 * w['base_fb']:.0f} | "
        f"{1e3 * w['ref_fb']:.0f} | {1e3 * w['fused_fb']:.0f} | {us(w['floor_fb_us'])} | "
        f"{w['ref_fb'] / w['fused_fb']:.2f} | {w['fused_fb'] / w['base_fb']:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes with the kernels interpreted (checks the script on CPU)")
  parser.add_argument("--ms", default="16,2048,8192", help="row counts M, comma-separated")
  parser.add_argument("--ranks", default="16,64,256", help="ranks r, comma-separated")
  parser.add_argument("--json", help="also write the rows (times in ms) to this file")
  args = parser.parse_args(argv)
  ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
  if args.smoke:
    rows = run((16, 77), 256, 256, (16, 24), jnp.float32, "interpret", 3)
  else:
    if jax.default_backend() not in ("gpu", "tpu"):
      raise SystemExit("bench/kernel.py times real kernels: run it on a GPU or TPU "
                       "(or --smoke to check the script on CPU)")
    rows = run(ints(args.ms), 4096, 4096, ints(args.ranks), jnp.bfloat16, "pallas",
               args.repeats)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine(), "rows": rows}, f, indent=1)
  head = (f"{machine_line()}; K = N = {4096 if not args.smoke else 256}, "
          f"{'bf16' if not args.smoke else 'f32 (smoke)'}, times in us (median of "
          f"{args.repeats if not args.smoke else 3})")
  out = f"{head}\n\n{table(rows)}\n"
  print(out)
  target = next((w for w in rows if w["M"] == 8192 and w["r"] == 16), None)
  if target:
    print(f"M=8192 r=16: fused f+b vs ref {target['ref_fb'] / target['fused_fb']:.2f}x "
          f"(target >= 1.15x), fused / base {target['fused_fb'] / target['base_fb']:.2f} "
          f"(target <= 1.1)")
  if args.record:
    path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
    with open(path, "a") as f:
      f.write(f"\n## Fused LoRA matmul (`python -m bench.kernel`), "
              f"{datetime.date.today().isoformat()}\n\n{out}")


if __name__ == "__main__":
  main()
