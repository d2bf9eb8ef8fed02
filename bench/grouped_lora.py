"""Many adapters' LoRA terms in one step: which grouped matmul (issue 35).

    python -m bench.grouped_lora [--adapters 1,8,64] [--rows 512] [--repeats 10] [--json F]
    python -m bench.grouped_lora --smoke

Every adapter owns ``--rows`` consecutive token rows (4 x 128 tokens: a quickstart batch)
of x [M, K]; each computes s (x_i A_i) B_i with its own A_i [K, r], B_i [r, N]. Forward +
backward (dx, dA, dB: what a training step runs), jitted, median wall time over repeats,
SmolLM2's projection shape (K = N = 576, r = 16), f32. The candidates:

- separate: N plain ``lora_term`` calls on static row slices, concatenated (the reference:
  what N solo steps compute, in one program; unrolled, so N sizes the program);
- ragged: ``jax.lax.ragged_dot`` over rows sorted by adapter (group sizes as data), twice;
- onehot: x @ [A_1 .. A_N] for every row, masked to the row's adapter, @ [B_1; ..; B_N]
  (N times the LoRA FLOPs, no gather);
- gather: A[ids], B[ids] per row (an [M, K, r] copy; skipped where it needs > 2 GiB).

It prints ms per candidate and the ratio to ``separate``; the winner on this machine is
what ``jlora.core.matmul`` uses (bench/RESULTS.md, "Grouped LoRA matmul").
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import block, machine, machine_line, median_ms
from jlora.kernels.reference import lora_term


def _separate(x, a, b, ids, sizes):
  del ids
  out, start = [], 0
  for i, n in enumerate(sizes):
    out.append(lora_term(x[start:start + n], a[i], b[i], 1.0))
    start += n
  return jnp.concatenate(out)


def _ragged(x, a, b, ids, sizes):
  del sizes
  gs = jnp.bincount(ids, length=a.shape[0]).astype(jnp.int32)
  t = jax.lax.ragged_dot(x, a, gs, preferred_element_type=jnp.float32)
  return jax.lax.ragged_dot(t, b, gs, preferred_element_type=jnp.float32)


def _onehot(x, a, b, ids, sizes):
  del sizes
  t = jnp.einsum("mk,nkr->mnr", x, a, preferred_element_type=jnp.float32)
  t = t * jax.nn.one_hot(ids, a.shape[0], dtype=t.dtype)[:, :, None]
  return jnp.einsum("mnr,nro->mo", t, b, preferred_element_type=jnp.float32)


def _gather(x, a, b, ids, sizes):
  del sizes
  t = jnp.einsum("mk,mkr->mr", x, a[ids], preferred_element_type=jnp.float32)
  return jnp.einsum("mr,mro->mo", t, b[ids], preferred_element_type=jnp.float32)


CANDIDATES = {"separate": _separate, "ragged": _ragged, "onehot": _onehot, "gather": _gather}


def _fwd_bwd(fn, sizes):
  def loss(x, a, b, ids):
    return jnp.sum(fn(x, a, b, ids, sizes) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def measure(adapters: int, rows: int, k: int, n: int, r: int, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  sizes = (rows,) * adapters
  m = rows * adapters
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  a = jnp.asarray(rng.standard_normal((adapters, k, r)) / np.sqrt(k), jnp.float32)
  b = jnp.asarray(rng.standard_normal((adapters, r, n)) / np.sqrt(r), jnp.float32)
  ids = jnp.asarray(np.repeat(np.arange(adapters), rows), jnp.int32)
  row = {"adapters": adapters, "rows": m}
  want = None
  for name, fn in CANDIDATES.items():
    if name == "gather" and m * k * r * 4 > 2 * 2**30:
      row[name] = None
      continue
    step = _fwd_bwd(fn, sizes)
    got = block(step(x, a, b, ids))
    if want is None:
      want = got
    else:  # every candidate computes the same gradients
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)
        assert err < 1e-4, f"{name}: relative error {err:.1e} against separate"
    row[name] = median_ms(lambda: block(step(x, a, b, ids)), repeats=repeats)
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--adapters", default="1,8,64")
  p.add_argument("--rows", type=int, default=512)
  p.add_argument("--k", type=int, default=576)
  p.add_argument("--n", type=int, default=576)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.smoke:
    args.adapters, args.rows, args.k, args.n, args.rank, args.repeats = "1,4", 8, 32, 32, 4, 2
  print(machine_line())
  print(f"K={args.k} N={args.n} r={args.rank}, {args.rows} rows per adapter, f32, fwd+bwd ms")
  rows = []
  for adapters in (int(s) for s in args.adapters.split(",")):
    row = measure(adapters, args.rows, args.k, args.n, args.rank, args.repeats)
    rows.append(row)
    base = row["separate"]
    print(f"N={adapters:3d}: " + ", ".join(
        f"{name} {row[name]:.1f} ms ({row[name] / base:.2f}x)" if row[name] is not None
        else f"{name} skipped" for name in CANDIDATES))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
