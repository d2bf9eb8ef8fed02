"""The benchmark's tiny Llama in idiomatic Flax NNX with ``nnx.LoRALinear`` (a peer, not
part of jlora): what a user of NNX's own LoRA would write."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class _Attn(nnx.Module):
  def __init__(self, d, heads, kv, hd, rank, rngs):
    lin = lambda i, o: nnx.LoRALinear(i, o, lora_rank=rank, use_bias=False, rngs=rngs)
    self.q, self.k, self.v = lin(d, heads * hd), lin(d, kv * hd), lin(d, kv * hd)
    self.o = lin(heads * hd, d)
    self.heads, self.kv, self.hd = heads, kv, hd

  def __call__(self, x, cos, sin):
    B, T, _ = x.shape
    q = self.q(x).reshape(B, T, self.heads, self.hd)
    k = self.k(x).reshape(B, T, self.kv, self.hd)
    v = self.v(x).reshape(B, T, self.kv, self.hd)
    rot = lambda t: jnp.concatenate([-t[..., self.hd // 2:], t[..., :self.hd // 2]], -1)
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.o(out.reshape(B, T, -1))


class _Block(nnx.Module):
  def __init__(self, d, f, heads, kv, hd, rank, rngs):
    lin = lambda i, o: nnx.LoRALinear(i, o, lora_rank=rank, use_bias=False, rngs=rngs)
    self.attn = _Attn(d, heads, kv, hd, rank, rngs)
    self.gate, self.up, self.down = lin(d, f), lin(d, f), lin(f, d)
    self.n1, self.n2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)

  def __call__(self, x, cos, sin):
    x = x + self.attn(self.n1(x), cos, sin)
    h = self.n2(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class NnxLlama(nnx.Module):
  def __init__(self, cfg, rank, rngs):
    self.embed = nnx.Embed(cfg["vocab_size"], cfg["hidden_size"], rngs=rngs)
    self.blocks = nnx.List([
        _Block(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_heads"],
               cfg["num_kv_heads"], cfg["head_dim"], rank, rngs)
        for _ in range(cfg["num_layers"])])
    self.norm = nnx.RMSNorm(cfg["hidden_size"], rngs=rngs)
    self.hd, self.theta = cfg["head_dim"], cfg["rope_theta"]

  def __call__(self, tokens):
    T = tokens.shape[1]
    inv = 1.0 / self.theta ** (jnp.arange(0, self.hd, 2) / self.hd)
    freqs = jnp.arange(T)[:, None] * inv
    cos = jnp.concatenate([jnp.cos(freqs)] * 2, -1)[None, :, None]
    sin = jnp.concatenate([jnp.sin(freqs)] * 2, -1)[None, :, None]
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, cos, sin)
    return self.embed.attend(self.norm(x))


def lora_train_step(cfg, batch, seq, rank, alpha, lr):
  """A closure that runs one jitted NNX LoRA training step (adapters only)."""
  del alpha  # nnx.LoRA has no alpha: scale 1 (its B is what the optimizer sees)
  model = NnxLlama(cfg, rank, nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(lr, weight_decay=0.0), wrt=nnx.LoRAParam)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg["vocab_size"],
                                                         (batch, seq + 1)), jnp.int32)

  @nnx.jit
  def step(model, opt, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return loss

  return lambda: jax.block_until_ready(step(model, opt, tokens))
