"""A GGUF base kept in the file's own block formats (``model.quantize = "gguf"``).

llama.cpp stores a quantised tensor as rows of blocks along its contraction axis: 32
weights per block for Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0, 256 per super-block for Q4_K /
Q5_K / Q6_K, each block a fixed number of bytes holding f16 scales, small integer scales
and the packed codes. Re-quantising such a tensor to nf4 adds a second rounding error to
the first (issue 20 measured +0.21 nats on SmolLM2's Q4_1 file); keeping the bytes and
dequantising them where the GEMM reads them computes exactly the model the file holds.

Layout (a ``quant.QTensor`` of format ``"gguf:<kind>"``): ``codes`` is uint8 with the
kernel's shape, its contraction axis counted in blocks, and one more trailing axis of the
block's bytes: a ``[L, K, N]`` kernel is ``[L, K / B, N, bytes]``, the ``[V, D]``
embedding ``[V, D / B, bytes]``. Sharding the codes by the kernel's spec (the trailing
axis replicated) keeps every block whole on one device, and ``nn.scan`` slices layers as
it slices the kernel. Files that give some layers of a stacked tensor another type
(llama.cpp's Q4_K_M keeps half of ``attn_v`` / ``ffn_down`` in Q6_K) pad the narrower
blocks to the widest; ``scale`` is then each layer's index into the kinds (int32, the
kernel's rank) and the step dequantises each layer with its own decoder
(``lax.switch``); a uniform tensor has no ``scale`` leaf.

The decoders are written here in jnp, from ggml's block layouts (``ggml-common.h``) as the
``gguf`` package's numpy ``gguf.quants`` reads them (the tests compare against it on
random blocks of every kind): XLA fuses them into the consumer like nf4's dequantisation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# kind -> (weights per block, bytes per block): ggml's type traits
KINDS = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
         "q8_0": (32, 34), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
FLOAT_TYPES = ("F32", "F16", "BF16")  # kept dense (dequantised exactly) in "gguf" mode
PREFIX = "gguf:"


def kinds_of(fmt: str) -> tuple[str, ...]:
  """``"gguf:q4_k+q6_k"`` -> ``("q4_k", "q6_k")``."""
  return tuple(fmt[len(PREFIX):].split("+"))


def block_size(fmt: str) -> int:
  sizes = {KINDS[k][0] for k in kinds_of(fmt)}
  if len(sizes) != 1:
    raise ValueError(f"{fmt}: kinds with different block sizes cannot share a tensor")
  return sizes.pop()


def kind(type_name: str, what: str) -> str | None:
  """The kind of a GGUF tensor type name (``"Q4_1"`` -> ``"q4_1"``), None for the float
  types; a type jlora has no decoder for is a one-line ValueError naming it."""
  if type_name in FLOAT_TYPES:
    return None
  if type_name.lower() not in KINDS:
    raise ValueError(f"{what} is {type_name}, which model.quantize='gguf' cannot keep; "
                     f"supported: {', '.join(k.upper() for k in KINDS)} (or use "
                     "model.quantize = 'nf4' / 'int8' / 'none')")
  return type_name.lower()


def _f16(b: jax.Array, at: int) -> jax.Array:
  """The little-endian f16 at byte ``at`` of each block, as f32: ``[...]``."""
  return jax.lax.bitcast_convert_type(b[..., at:at + 2], jnp.float16).astype(jnp.float32)


def _nibbles(q: jax.Array, width: int) -> jax.Array:
  """Bytes ``[..., n]`` -> 4-bit codes ``[..., 2n]``: each run of ``width`` bytes gives its
  low nibbles, then its high nibbles (ggml's order)."""
  runs = q.reshape(*q.shape[:-1], -1, 1, width) >> jnp.array([0, 4], jnp.uint8)[:, None]
  return (runs & 15).reshape(*q.shape[:-1], -1)


def _high_bits(qh: jax.Array, count: int) -> jax.Array:
  """Q5_0 / Q5_1's 32 fifth bits: bit i of the little-endian uint32 -> ``[..., 32]``."""
  word = jax.lax.bitcast_convert_type(qh.reshape(*qh.shape[:-1], 1, 4), jnp.uint32)
  return ((word >> jnp.arange(count, dtype=jnp.uint32)) & 1).astype(jnp.uint8)


def _k_scales(s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Q4_K / Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins."""
  d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
  sc = jnp.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
  mn = jnp.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
  return sc.astype(jnp.float32), mn.astype(jnp.float32)


def _q4_0(b):
  return _f16(b, 0)[..., None] * (_nibbles(b[..., 2:], 16).astype(jnp.float32) - 8)


def _q4_1(b):
  q = _nibbles(b[..., 4:], 16).astype(jnp.float32)
  return _f16(b, 0)[..., None] * q + _f16(b, 2)[..., None]


def _q5(b, at):
  return (_nibbles(b[..., at + 4:], 16) | (_high_bits(b[..., at:at + 4], 32) << 4)
          ).astype(jnp.float32)


def _q5_0(b):
  return _f16(b, 0)[..., None] * (_q5(b, 2) - 16)


def _q5_1(b):
  return _f16(b, 0)[..., None] * _q5(b, 4) + _f16(b, 2)[..., None]


def _q8_0(b):
  q = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
  return _f16(b, 0)[..., None] * q


def _k_quant(b, q):
  """Q4_K / Q5_K: 8 sub-blocks of 32, each ``d * scale * q - dmin * min``."""
  sc, mn = _k_scales(b[..., 4:16])
  d = (_f16(b, 0)[..., None] * sc)[..., None]
  dm = (_f16(b, 2)[..., None] * mn)[..., None]
  q = q.astype(jnp.float32).reshape(*b.shape[:-1], 8, 32)
  return (d * q - dm).reshape(*b.shape[:-1], 256)


def _q4_k(b):
  return _k_quant(b, _nibbles(b[..., 16:144], 32))


def _q5_k(b):
  qh = b[..., 16:48].reshape(*b.shape[:-1], 1, 32) >> jnp.arange(8, dtype=jnp.uint8)[:, None]
  high = (qh & 1).reshape(*b.shape[:-1], 256)
  return _k_quant(b, _nibbles(b[..., 48:176], 32) | (high << 4))


def _q6_k(b):
  lead = b.shape[:-1]
  low = _nibbles(b[..., :128], 64)
  qh = b[..., 128:192].reshape(*lead, 2, 1, 32) >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]
  q = (low | ((qh & 3).reshape(*lead, 256) << 4)).astype(jnp.float32) - 32
  scales = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)
  d = (_f16(b, 208)[..., None] * scales)[..., None]
  return (d * q.reshape(*lead, 16, 16)).reshape(*lead, 256)


DECODERS = {"q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "q8_0": _q8_0,
            "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}


def decode(blocks: jax.Array, kind: str) -> jax.Array:
  """Blocks ``[..., bytes]`` (uint8, possibly padded past the kind's size) -> f32
  ``[..., B]``."""
  return DECODERS[kind](blocks[..., :KINDS[kind][1]])


def dequantize(codes: jax.Array, which: jax.Array | None, fmt: str, axis: int) -> jax.Array:
  """A ``"gguf:..."`` QTensor's kernel in f32: each block decoded, its weights laid back
  along the contraction ``axis`` (negative, of the kernel). ``which``: the kinds index of
  a mixed tensor (a scalar-sized slice inside the layer scan: one decoder runs), else
  None."""
  kinds = kinds_of(fmt)
  if which is None:
    vals = decode(codes, kinds[0])
  elif which.size == 1:
    vals = jax.lax.switch(which.reshape(()), [lambda c, k=k: decode(c, k) for k in kinds],
                          codes)
  else:  # a whole stack (e.g. the merge): every layer through each decoder, then picked
    pick = which[..., None]
    vals = decode(codes, kinds[0])
    for i, k in enumerate(kinds[1:], 1):
      vals = jnp.where(pick == i, decode(codes, k), vals)
  at = codes.ndim - 1 + axis  # the block axis
  vals = jnp.moveaxis(vals, -1, at + 1)
  shape = list(codes.shape[:-1])
  shape[at] *= vals.shape[at + 1]
  return vals.reshape(shape)


@dataclasses.dataclass
class Blocks:
  """One GGUF tensor's blocks on the host: ``data`` uint8 ``[..., K / B, ..., bytes]``
  with the contraction axis ``axis`` (of the logical tensor, negative) counted in
  blocks."""
  data: np.ndarray
  kind: str
  axis: int

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical (dequantised) tensor's shape."""
    shape = list(self.data.shape[:-1])
    shape[self.data.ndim - 1 + self.axis] *= KINDS[self.kind][0]
    return tuple(shape)

  @property
  def T(self) -> "Blocks":  # noqa: N802 (numpy's name: hf.assembled transposes with it)
    """A 2-D tensor's transpose ([out, in] -> [in, out]), the bytes axis kept last."""
    if self.data.ndim != 3:
      raise ValueError("only 2-D block tensors transpose")
    return Blocks(self.data.transpose(1, 0, 2), self.kind, -1 - (2 + self.axis))


class Stack:
  """A stacked parameter (layers) assembled from one ``Blocks`` per slice; ``parts`` gives
  its ``quant.QTensor``'s fields (``quant.from_stack``)."""

  def __init__(self, lead: tuple[int, ...], name: str):
    self.lead, self.name = lead, name
    self.slices: dict[tuple[int, ...], Blocks] = {}

  def __setitem__(self, index: tuple[int, ...], x: Blocks) -> None:
    self.slices[index] = x

  def parts(self) -> tuple[np.ndarray, np.ndarray | None, str, int]:
    """(codes, scale: the kinds index or None, format, axis)."""
    first = next(iter(self.slices.values()))
    kinds = tuple(sorted({b.kind for b in self.slices.values()}, key=list(KINDS).index))
    fmt = PREFIX + "+".join(kinds)
    if len({KINDS[k][0] for k in kinds}) > 1:
      raise ValueError(f"{self.name}: its layers mix block sizes ({', '.join(kinds)}), which "
                       "model.quantize='gguf' cannot stack")
    width = max(KINDS[k][1] for k in kinds)
    codes = np.zeros(self.lead + first.data.shape[:-1] + (width,), np.uint8)
    which = np.zeros(self.lead + (1,) * (first.data.ndim - 1), np.int32)
    for index, b in self.slices.items():
      codes[index][..., :b.data.shape[-1]] = b.data
      which[index] = kinds.index(b.kind)
    return codes, which if len(kinds) > 1 else None, fmt, first.axis
