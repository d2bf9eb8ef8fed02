"""Small third-party-style Flax models the tests adapt (nothing jlora-specific in them)."""

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


class Mlp(nn.Module):
  """A plain linen MLP, as a user might bring."""
  hidden: int = 32
  out: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.hidden)(x))
    x = nn.gelu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.out)(x)


class Block(nn.Module):
  """Attention-like DenseGeneral projections ([embed, heads, head_dim]) and an Einsum
  expert layer ([experts, embed, ffn]), so kernels are 3-D."""
  heads: int = 2
  head_dim: int = 8
  experts: int = 3

  @nn.compact
  def __call__(self, x, _=None):
    d = x.shape[-1]
    q = nn.DenseGeneral((self.heads, self.head_dim), name="q")(x)
    k = nn.DenseGeneral((self.heads, self.head_dim), name="k")(x)
    v = nn.DenseGeneral((self.heads, self.head_dim), name="v")(x)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / self.head_dim**0.5)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    x = x + nn.DenseGeneral(d, axis=(-2, -1), name="o")(o)
    up = nn.Einsum((self.experts, d, 16), "btd,edf->btef", use_bias=False, name="up")(x)
    down = nn.Einsum((self.experts, 16, d), "btef,efd->btd", use_bias=False, name="down")
    return x + down(nn.gelu(up)) / self.experts, None


class ScannedStack(nn.Module):
  """Two Blocks through nn.scan: every kernel gets a leading layer axis."""
  layers: int = 2

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=self.layers)
    x, _ = scan(name="blocks")(x, None)
    return x


class NnxModel(nnx.Module):
  """An NNX model with Linear, LinearGeneral and Einsum layers, some in a list."""

  def __init__(self, rngs: nnx.Rngs, d: int = 8):
    self.inp = nnx.Linear(d, 16, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])
    self.heads = nnx.LinearGeneral(16, (2, 8), rngs=rngs)
    self.mix = nnx.Einsum("bnh,nhd->bd", (2, 8, 16), rngs=rngs)
    self.out = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.inp(x))
    for layer in self.layers:
      x = nnx.relu(layer(x))
    x = self.mix(nnx.relu(self.heads(x)))
    return self.out(x)
