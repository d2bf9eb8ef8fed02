"""A frozen base stored quantised (QLoRA): ``model.quantize = "int8" | "nf4"``.

``QTensor`` replaces a kernel in the parameter tree. The model dequantises it where it
multiplies by it, inside the jitted step (``dense``), so XLA fuses the dequantisation
into the consumer and no dequantised copy outlives its layer; the adapters stay f32.

Formats (``axis`` is the kernel's contraction axis, ``K``):
- ``int8``: one f32 scale per output channel (absmax / 127 over K); 1 byte per weight.
- ``nf4``: the QLoRA format: blocks of 64 weights along K, each with an f32 absmax scale,
  each weight one of the 16 NormalFloat levels; 0.5625 bytes per weight. QLoRA's "double
  quantisation" of the scales (another 0.37 bits saved) is not done.

The quantisation math (absmax calibration, the NF4 code book and rounding, dequantisation)
is qwix's (``qwix.quantize`` / ``qwix.dequantize``). Only the storage is jlora's: qwix
keeps nf4 codes as ``uint4``, which XLA:CPU stores one per byte, so two codes are packed
per ``uint8`` here and unpacked in ``dequantize``.

Stacked leading axes (scanned layers, experts) are channel axes: ``nn.scan`` slicing a
QTensor's leaves slices whole layers, and sharding a QTensor's leaves like the kernel
(``sharding.place_leaf``) keeps every block with its scale.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlora.core import ggml

FORMATS = ("none", "int8", "nf4", "gguf")  # gguf: the file's own blocks (jlora.core.ggml)
BLOCK = 64  # nf4 block size along the contraction axis (QLoRA's)
_CHUNK = 1 << 22  # weights quantised per call while loading (nf4's rounding is 16x wider)


@struct.dataclass
class QTensor:
  """A quantised kernel: ``codes`` (int8, or uint8 holding two nf4 codes along ``axis``)
  and f32 ``scale`` (``[..., 1, ...]`` for int8, ``[..., K / 64, ...]`` for nf4), both
  with the kernel's rank; or a GGUF's blocks (format ``"gguf:<kind>"``: ``jlora.core.ggml``
  has the layout; ``scale`` None or the kinds index of a mixed stack). ``shape`` is the
  kernel's; ``dtype`` the model's compute dtype."""
  codes: jax.Array
  scale: jax.Array | None
  format: str = struct.field(pytree_node=False)
  axis: int = struct.field(pytree_node=False)  # negative: valid after slicing lead axes
  dtype: Any = struct.field(pytree_node=False)
  # nf4 with double quantisation (``double_quantize``): ``scale`` int8, and per block of
  # scales an f32 scale; per layer an f32 offset (the scales' mean). None otherwise.
  scale_scale: jax.Array | None = None
  scale_offset: jax.Array | None = None

  @property
  def shape(self) -> tuple[int, ...]:
    if self.format.startswith(ggml.PREFIX):
      shape = list(self.codes.shape[:-1])
      shape[self.axis] *= ggml.block_size(self.format)
      return tuple(shape)
    shape = list(self.codes.shape)
    if self.format == "nf4":
      shape[self.axis] *= 2
    return tuple(shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(self))

  def dequantize(self, dtype=None) -> jax.Array:
    """The kernel in ``dtype`` (default: the model's)."""
    dtype = dtype or self.dtype
    if self.format.startswith(ggml.PREFIX):
      return ggml.dequantize(self.codes, self.scale, self.format, self.axis).astype(dtype)
    import qwix  # where used: unquantised and gguf runs need no qwix
    if self.format == "int8":
      q = qwix.QArray(self.codes, self.scale, qtype=jnp.int8)
    else:
      scale = self.scale
      if self.scale_scale is not None:
        scale = (qwix.dequantize(qwix.QArray(scale, self.scale_scale, qtype=jnp.int8)) +
                 self.scale_offset)
      q = qwix.QArray(_unpack(self.codes, self.axis).astype(jnp.uint4), scale, qtype="nf4")
    return qwix.dequantize(q).astype(dtype)


def embedding_format(quantize: str, embeddings: str = "auto") -> str:
  """The format of the embedding table and LM head under ``model.quantize``:
  ``model.quantize_embeddings`` ("none" for an unquantised base), where "auto" is int8 for
  an nf4 base and the base's format otherwise; an unknown name is a ValueError. Why int8
  under nf4: docs/ARCHITECTURE.md, "QLoRA"."""
  if embeddings not in ("auto", *FORMATS):
    raise ValueError(f"model.quantize_embeddings {embeddings!r} is not one of auto, "
                     f"{', '.join(FORMATS)}")
  if embeddings == "gguf" and quantize != "gguf":
    raise ValueError("model.quantize_embeddings 'gguf' keeps the file's own blocks: it needs "
                     "model.quantize = 'gguf'")
  if embeddings != "auto":
    return embeddings if quantize != "none" else "none"
  return "int8" if quantize == "nf4" else quantize


def from_stack(stack: ggml.Stack, dtype) -> QTensor:
  """A GGUF tensor's blocks (``ggml.Stack``, on the host) as a QTensor computing in
  ``dtype``."""
  return QTensor(*stack.parts(), jnp.dtype(dtype))


def is_quantized(x) -> bool:
  return isinstance(x, QTensor)


def dense(w, dtype) -> jax.Array:
  """A kernel as an array in ``dtype``: dequantised if quantised, else cast."""
  return w.dequantize(dtype) if isinstance(w, QTensor) else w.astype(dtype)


def take_rows(w, ids: jax.Array, dtype) -> jax.Array:
  """``w[ids]`` in ``dtype`` (an embedding lookup); a QTensor quantised along its last
  axis dequantises only the rows taken."""
  if isinstance(w, QTensor) and w.axis != -1:
    raise ValueError("take_rows needs a QTensor quantised along its last axis")
  return dense(map_rows(w, lambda x: jnp.take(x, ids, axis=0)), dtype)


def map_rows(w, fn):
  """``fn`` (which takes or slices rows: axis 0) applied to a table ``w``, or to each leaf
  of a QTensor quantised along its last axis; leaves that broadcast over the rows (axis 0
  of size 1: double quantisation's offset) are kept as they are."""
  rows = w.shape[0]
  return jax.tree.map(lambda x: x if x.shape[0] == 1 < rows else fn(x), w)


def fits(shape: tuple[int, ...], fmt: str, axis: int) -> bool:
  """Whether ``fmt`` can store a tensor of ``shape`` (nf4: K divisible by 64)."""
  return fmt == "int8" or (fmt == "nf4" and shape[axis] % BLOCK == 0)


def quantize(x: np.ndarray, fmt: str, axis: int, dtype, double: bool = False) -> QTensor:
  """``x`` (host array, any float dtype) quantised along ``axis`` (negative), in chunks
  of channels so a large tensor never needs nf4's 16-wide rounding buffer at once;
  ``double``: nf4's scales quantised too (``double_quantize``). Returns a QTensor of host
  (numpy) arrays, ready to be placed on devices."""
  if fmt not in ("int8", "nf4"):
    raise ValueError(f"model.quantize must be one of {FORMATS}, got {fmt!r}")
  if not fits(x.shape, fmt, axis):
    raise ValueError(f"nf4 needs the contraction axis divisible by {BLOCK}, got {x.shape}")
  chunk_axis = 0 if x.ndim + axis != 0 else x.ndim - 1  # a channel axis: chunks are exact
  step = max(1, _CHUNK * x.shape[chunk_axis] // max(x.size, 1))
  parts = [_quantize_jit(jnp.asarray(np.take(x, range(i, min(i + step, x.shape[chunk_axis])),
                                             axis=chunk_axis), jnp.float32), fmt, axis)
           for i in range(0, x.shape[chunk_axis], step)]
  codes = np.concatenate([np.asarray(c) for c, _ in parts], axis=chunk_axis)
  scale = np.concatenate([np.asarray(s) for _, s in parts], axis=chunk_axis)
  q = QTensor(codes, scale, fmt, axis, jnp.dtype(dtype))
  return double_quantize(q) if double else q


SCALE_BLOCK = 256  # nf4 scales per second-level block (QLoRA's)


def double_quantize(q: QTensor) -> QTensor:
  """QLoRA's double quantisation of an nf4 tensor's f32 block scales: per layer their mean
  is subtracted (an f32 offset: absmax scales are all positive, so the centred ones use
  int8's range), then int8 with one f32 absmax scale per block of scales. QLoRA blocks 256
  scales of the flattened tensor with an 8-bit float code; here the blocks lie along the
  scales' last axis (a kernel's output channels; an embedding row's blocks), 256 or the
  largest divisor of that axis below it, so every leaf keeps the kernel's rank (``nn.scan``
  slicing, ``place_leaf`` sharding and an embedding lookup's row gather stay as for nf4)
  and the code is qwix's int8. Saves 4 - 1 - 4 / block bytes per 64 weights: 0.37 bits per
  weight at blocks of 256 (QLoRA's 0.373); an int8 step is set by the block's largest
  centred scale, so a block with outlier scales rounds the others coarsely."""
  if q.format != "nf4" or q.scale_scale is not None:
    raise ValueError("double quantisation applies to nf4 tensors (once)")
  import qwix
  scale = jnp.asarray(q.scale)
  offset = jnp.mean(scale, axis=(-2, -1), keepdims=True)
  channel = scale.ndim - 1
  block = max(b for b in range(1, SCALE_BLOCK + 1) if scale.shape[channel] % b == 0)
  lead = [a for a in range(scale.ndim) if a != channel]
  s = qwix.quantize(scale - offset, jnp.int8, channelwise_axes=lead,
                    tiled_axes={channel: block}, scale_dtype=jnp.float32)
  return q.replace(scale=np.asarray(s.qvalue), scale_scale=np.asarray(s.scale),
                   scale_offset=np.asarray(offset))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_jit(x: jax.Array, fmt: str, axis: int):
  import qwix
  channels = [a for a in range(x.ndim) if a != x.ndim + axis]
  if fmt == "int8":
    q = qwix.quantize(x, jnp.int8, channelwise_axes=channels, scale_dtype=jnp.float32)
    return q.qvalue, q.scale
  q = qwix.quantize(x, "nf4", channelwise_axes=channels, tiled_axes={x.ndim + axis: BLOCK},
                    scale_dtype=jnp.float32)
  return _pack(q.qvalue.astype(jnp.uint8), axis), q.scale


def _pack(codes: jax.Array, axis: int) -> jax.Array:
  """Codes 0..15 -> uint8, element 2i in the low and 2i+1 in the high nibble along axis."""
  lo = jax.lax.slice_in_dim(codes, 0, None, 2, axis)
  hi = jax.lax.slice_in_dim(codes, 1, None, 2, axis)
  return lo | (hi << 4)


def _unpack(packed: jax.Array, axis: int) -> jax.Array:
  axis = packed.ndim + axis
  both = jnp.stack([packed & 15, packed >> 4], axis=axis + 1)
  shape = list(packed.shape)
  shape[axis] *= 2
  return both.reshape(shape)


def dequantize_tree(tree, dtype=None):
  """Every QTensor in ``tree`` as a dense array (its own dtype unless ``dtype``)."""
  return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, QTensor) else x, tree,
                      is_leaf=is_quantized)


def stored_bytes(tree) -> int:
  """Bytes of every array in ``tree`` (a QTensor: its codes and scales)."""
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))
