"""jlora.core.ggml: a GGUF's own blocks kept on device. Every kind's decoder against the
``gguf`` package's numpy ``gguf.quants.dequantize`` on random blocks (every bit pattern of
the codes and small scales), the kernel layout, stacks that mix kinds per layer (whole,
one layer at a time as the layer scan slices them, and sharded), one-line refusals."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jlora.core import ggml, quant, sharding
from jlora.infra import mesh as mesh_lib

# byte offsets of each kind's f16 scales (ggml-common.h's block structs)
F16_AT = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,),
          "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def _random_rows(kind, rows, blocks, seed=0):
  """``[rows, blocks * bytes]`` uint8: random codes, finite random f16 scales."""
  rng = np.random.default_rng(seed)
  size = ggml.KINDS[kind][1]
  data = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
  for at in F16_AT[kind]:
    half = (rng.standard_normal((rows, blocks)) * 0.01).astype(np.float16)
    data[..., at:at + 2] = half.view(np.uint8).reshape(rows, blocks, 2)
  return data.reshape(rows, -1)


def _numpy(kind, rows):
  return gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[kind.upper()])


@pytest.mark.parametrize("kind", list(ggml.KINDS))
def test_every_kind_decodes_as_the_gguf_package_does(kind):
  block, size = ggml.KINDS[kind]
  rows = _random_rows(kind, 6, 3)
  want = _numpy(kind, rows)
  got = ggml.decode(jnp.asarray(rows.reshape(6, 3, size)), kind).reshape(6, 3 * block)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  # As a [in, out] kernel (HF's [out, in] rows transposed): the blocks lie along the
  # contraction axis, so the kernel is the file's tensor transposed.
  stack = ggml.Stack((), "w")
  stack[()] = ggml.Blocks(rows.reshape(6, 3, size), kind, -1).T
  q = quant.from_stack(stack, jnp.float32)
  assert q.shape == (3 * block, 6) and q.scale is None and q.nbytes == rows.nbytes
  np.testing.assert_allclose(np.asarray(q.dequantize()), want.T, rtol=1e-6, atol=1e-7)


def test_a_stack_mixing_kinds_dequantises_each_layer_with_its_own():
  kinds = ["q4_k", "q6_k", "q4_k"]
  rows = [_random_rows(k, 8, 2, seed=i) for i, k in enumerate(kinds)]
  want = np.stack([_numpy(k, r).T for k, r in zip(kinds, rows)])  # [layers, 512, 8]
  stack = ggml.Stack((3,), "layers/attn/v_proj/kernel")
  for i, (k, r) in enumerate(zip(kinds, rows)):
    stack[(i,)] = ggml.Blocks(r.reshape(8, 2, -1), k, -1).T
  q = jax.tree.map(jnp.asarray, quant.from_stack(stack, jnp.float32))
  assert q.format == "gguf:q4_k+q6_k" and q.shape == (3, 512, 8)
  assert q.codes.shape == (3, 2, 8, 210) and q.scale.shape == (3, 1, 1)
  np.testing.assert_allclose(np.asarray(q.dequantize()), want, rtol=1e-6, atol=1e-7)
  # One layer at a time, as nn.scan slices the stacked parameters (lax.switch per layer).
  _, each = jax.lax.scan(lambda c, layer: (c, layer.dequantize()), None, q)
  np.testing.assert_allclose(np.asarray(each), want, rtol=1e-6, atol=1e-7)
  # Sharded like the kernel [layers, in, out]: blocks whole on a device, the bytes axis
  # replicated; the dequantised kernel is the same.
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=2, tensor=4))
  placed = sharding.place_leaf(quant.from_stack(stack, jnp.float32), P(None, "fsdp", "tensor"), mesh)
  assert placed.codes.sharding.spec == P(None, "fsdp", "tensor", None)
  assert placed.codes.addressable_shards[0].data.shape == (3, 1, 2, 210)
  np.testing.assert_allclose(np.asarray(jax.jit(lambda x: x.dequantize())(placed)), want,
                             rtol=1e-6, atol=1e-7)


def test_the_embedding_layout_takes_rows_of_blocks():
  rows = _random_rows("q8_0", 10, 2)  # a [10, 64] table: blocks along its feature axis
  stack = ggml.Stack((), "embed/embedding")
  stack[()] = ggml.Blocks(rows.reshape(10, 2, 34), "q8_0", -1)
  q = jax.tree.map(jnp.asarray, quant.from_stack(stack, jnp.float32))
  ids = jnp.array([[3, 0], [9, 3]])
  np.testing.assert_allclose(np.asarray(quant.take_rows(q, ids, jnp.float32)),
                             _numpy("q8_0", rows)[np.asarray(ids)], rtol=1e-6, atol=1e-7)


def test_kinds_it_cannot_keep_are_one_line():
  with pytest.raises(ValueError) as e:
    ggml.kind("Q2_K", "m.gguf: tensor blk.0.attn_q.weight")
  assert str(e.value).startswith("m.gguf: tensor blk.0.attn_q.weight is Q2_K, which "
                                 "model.quantize='gguf' cannot keep; supported: Q4_0, Q4_1")
  assert "\n" not in str(e.value) and ggml.kind("F16", "x") is None
  stack = ggml.Stack((2,), "layers/mlp/down_proj/kernel")
  stack[(0,)] = ggml.Blocks(_random_rows("q8_0", 4, 8).reshape(4, 8, 34), "q8_0", -1).T
  stack[(1,)] = ggml.Blocks(_random_rows("q4_k", 4, 1).reshape(4, 1, 144), "q4_k", -1).T
  with pytest.raises(ValueError, match="layers/mlp/down_proj/kernel: its layers mix block "
                                       "sizes"):
    quant.from_stack(stack, jnp.float32)
