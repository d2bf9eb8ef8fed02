"""Llama 3 / Qwen 3 / Qwen 3 MoE as one linen decoder.

Every projection is a ``Linear`` that calls ``jlora.core.matmul.lora_dense`` on 2-D activations;
if ``jlora.core.lora.with_adapters`` placed ``lora_a``/``lora_b`` in its scope, the LoRA term
rides in the same f32 accumulator and W + BA is never formed. Layers are one ``nn.scan``
(stacked ``[layers, ...]`` parameters: one compile of one layer, and adapters stacked the
same way); MoE experts are stacked ``[experts, ...]`` kernels run with ``ragged_dot`` over
tokens sorted by expert. Parameters carry logical axis names ("layers", "embed", "heads",
"kv", "mlp", "experts", "vocab") for the sharding table.

The KV cache is explicit: ``{"k", "v": [layers, batch, slots, kv_heads, head_dim],
"valid": [batch, slots], "end": int}``; attention is causal over slots and ignores invalid
slots (left padding), while RoPE uses token positions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jlora import kernels
from jlora.core import matmul as matmul_lib, quant
from jlora.core.lora import LORA_A, LORA_B
from jlora.models.config import ModelConfig

_init = nn.initializers.normal(0.02)


def _kernel(module: nn.Module, name: str, axes: tuple[str, ...], shape: tuple[int, ...]):
  """The module's kernel: a ``quant.QTensor`` where the base is stored quantised (handed
  over as is: the consumer dequantises it), else the param (initialised when absent)."""
  if module.has_variable("params", name):
    value = module.get_variable("params", name)
    if quant.is_quantized(value):
      if value.shape != shape:
        raise ValueError(f"{module.path}/{name}: quantised kernel of shape {value.shape}, "
                         f"the config implies {shape}")
      return value
  return module.param(name, nn.with_logical_partitioning(_init, axes), shape, jnp.float32)


def _lora_factors(module: nn.Module):
  if module.has_variable("params", LORA_A):
    return module.get_variable("params", LORA_A), module.get_variable("params", LORA_B)
  return None, None


class Linear(nn.Module):
  """x @ kernel[in, out] (+ LoRA) via ``matmul_lib.lora_dense``. ``factors`` hands the kernel and
  adapter to a caller that runs several projections of one input together."""
  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  dtype: Any = jnp.float32
  impl: str = "xla"  # LoRA matmul implementation (jlora.kernels.IMPLS)

  @nn.compact
  def factors(self, in_features: int):
    """(kernel, lora_a or None, lora_b or None, bias or None) of this projection."""
    kernel = _kernel(self, "kernel", self.axes, (in_features, self.features))
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[1:]),
                        (self.features,), jnp.float32)
    return (kernel, *_lora_factors(self), bias)

  def __call__(self, x):
    return project(x, [self], self.dtype)[0]


def project(x, layers: list[Linear], dtype):
  """The same input through several Linears at once (``matmul_lib.lora_dense_multi``)."""
  factors = [l.factors(x.shape[-1]) for l in layers]
  outs = matmul_lib.lora_dense_multi(x.astype(dtype), [f[:3] for f in factors], impl=layers[0].impl)
  return [y if f[3] is None else y + f[3].astype(y.dtype) for f, y in zip(factors, outs)]


class RMSNorm(nn.Module):
  eps: float = 1e-6
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale * x32.astype(x.dtype)).astype(x.dtype)


def rope_tables(positions_BT, inv_freq):
  """(cos, sin) [B, T, head_dim/2], computed once per step and shared by every layer (left
  inside a layer, XLA fuses the trig into each head's rotation and recomputes it)."""
  freqs = positions_BT[..., None].astype(jnp.float32) * inv_freq
  return jnp.cos(freqs), jnp.sin(freqs)


def rope(x_BTNH, cos_sin):
  """Rotary embedding in the rotate-half layout HF checkpoints use."""
  cos, sin = (t[:, :, None, :] for t in cos_sin)
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def _fused_attention(dtype) -> str | None:
  """"cudnn" on GPU for 16-bit compute (JAX's automatic choice stays on XLA there, which
  writes [B, heads, T, T] scores to memory); None (XLA) elsewhere."""
  if kernels.platform() == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return None


class Attention(nn.Module):
  cfg: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD, cos_sin, mask_BTS, cache):
    c = self.cfg
    B, T, _ = x_BTD.shape
    lin = lambda n, axes, name: Linear(n, axes, c.attention_bias, self.dtype, c.lora_impl,
                                       name=name)
    q, k, v = project(x_BTD, [lin(c.num_heads * c.head_dim, ("embed", "heads"), "q_proj"),
                              lin(c.num_kv_heads * c.head_dim, ("embed", "kv"), "k_proj"),
                              lin(c.num_kv_heads * c.head_dim, ("embed", "kv"), "v_proj")],
                      self.dtype)
    q = q.reshape(B, T, c.num_heads, c.head_dim)
    k = k.reshape(B, T, c.num_kv_heads, c.head_dim)
    v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      q = RMSNorm(c.rms_norm_eps, "head_dim", name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, "head_dim", name="k_norm")(k)
    q, k = rope(q, cos_sin), rope(k, cos_sin)
    if cache is not None:  # write this chunk at slots [end, end + T)
      k_cache = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                    cache["end"], axis=1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                    cache["end"], axis=1)
      cache = {**cache, "k": k_cache, "v": v_cache}
      k, v = k_cache.astype(self.dtype), v_cache.astype(self.dtype)
    if mask_BTS is None:  # plain causal: cuDNN flash attention where it applies
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                         implementation=_fused_attention(q.dtype))
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask_BTS[:, None])
    out = out.reshape(B, T, c.num_heads * c.head_dim)
    return lin(c.hidden_size, ("heads", "embed"), "o_proj")(out), cache


class Mlp(nn.Module):
  cfg: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    lin = lambda n, axes, name: Linear(n, axes, dtype=self.dtype, impl=c.lora_impl, name=name)
    gate, up = project(x, [lin(c.intermediate_size, ("embed", "mlp"), "gate_proj"),
                           lin(c.intermediate_size, ("embed", "mlp"), "up_proj")], self.dtype)
    return lin(c.hidden_size, ("mlp", "embed"), "down_proj")(jax.nn.silu(gate) * up)


class ExpertLinear(nn.Module):
  """Per-expert kernels [E, in, out] applied to tokens sorted by expert."""
  num_experts: int
  features: int
  axes: tuple[str, str, str]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_MK, group_sizes_E):
    kernel = _kernel(self, "kernel", self.axes,
                     (self.num_experts, x_MK.shape[-1], self.features))
    a, b = _lora_factors(self)
    if a is not None and a.ndim == 4:
      raise ValueError(f"{self.path}: stacked adapters on MoE experts are not supported yet "
                       "(target the attention and dense MLP kernels)")
    return matmul_lib.lora_ragged_dot(x_MK.astype(self.dtype), kernel, group_sizes_E, a, b)


class Moe(nn.Module):
  """Qwen 3 MoE block: softmax router, top-k, SwiGLU experts."""
  cfg: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    c = self.cfg
    B, T, D = x_BTD.shape
    x_MD = x_BTD.reshape(-1, D)
    logits = Linear(c.num_experts, ("embed", "experts"), dtype=self.dtype,
                    name="router")(x_MD)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, c.experts_per_token)  # [M, k]
    if c.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    order = jnp.argsort(experts.reshape(-1))
    token = order // c.experts_per_token
    group_sizes = jnp.bincount(experts.reshape(-1), length=c.num_experts).astype(jnp.int32)
    xs = x_MD[token]
    axes_in, axes_out = ("experts", "embed", "mlp"), ("experts", "mlp", "embed")
    f = c.moe_intermediate_size
    gate = ExpertLinear(c.num_experts, f, axes_in, self.dtype, name="gate_proj")(xs, group_sizes)
    up = ExpertLinear(c.num_experts, f, axes_in, self.dtype, name="up_proj")(xs, group_sizes)
    ys = ExpertLinear(c.num_experts, D, axes_out, self.dtype, name="down_proj")(
        jax.nn.silu(gate) * up, group_sizes)
    ys = ys * weights.reshape(-1)[order][:, None].astype(ys.dtype)
    y = jnp.zeros_like(x_MD).at[token].add(ys.astype(x_MD.dtype))
    return y.reshape(B, T, D)


class Embed(nn.Module):
  """Token embedding ``[vocab, embed]`` (``nn.Embed``'s parameter tree) that also takes a
  quantised table: a lookup dequantises only the rows it gathers."""
  num_embeddings: int
  features: int

  def setup(self):
    shape = (self.num_embeddings, self.features)
    self.embedding = _kernel(self, "embedding", ("vocab", "embed"), shape)

  def __call__(self, tokens, dtype):
    return quant.take_rows(self.embedding, tokens, dtype)

  def table(self, dtype):
    """The whole table in ``dtype`` (the tied unembedding)."""
    return quant.dense(self.embedding, dtype)

  def rows(self, start, size: int, dtype):
    """Rows ``start .. start + size`` of the table in ``dtype`` (a quantised table
    dequantises only those); ``start`` may be traced; rows past the end are padding (zero
    codes: zeros, or nf4's lowest level times a double-quantised offset), which the caller
    masks (``target_logprobs``)."""
    pad = lambda x: jnp.pad(x, [(0, -x.shape[0] % size)] + [(0, 0)] * (x.ndim - 1))  # noqa
    cut = lambda x: jax.lax.dynamic_slice_in_dim(pad(x), start, size, 0)  # noqa: E731
    return quant.dense(quant.map_rows(self.embedding, cut), dtype)


class Block(nn.Module):
  cfg: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos_sin, mask, cache):
    c = self.cfg
    h, cache = Attention(c, self.dtype, name="attn")(
        RMSNorm(c.rms_norm_eps, name="input_norm")(x), cos_sin, mask, cache)
    x = x + h
    mlp = Moe(c, self.dtype, name="moe") if c.is_moe else Mlp(c, self.dtype, name="mlp")
    x = x + mlp(RMSNorm(c.rms_norm_eps, name="post_attn_norm")(x))
    return x, cache


class Transformer(nn.Module):
  """Decoder-only LM. ``__call__(tokens, positions=None, segment_ids=None, cache=None)``
  returns ``(logits [B, T, V] f32, cache)``; ``hidden`` stops before the unembedding.
  Negative segment ids mark a prefix shared by the segments after it (``_mask``)."""
  cfg: ModelConfig
  dtype: Any = jnp.float32
  shared_prefix = True  # understands negative segment ids (RL's grouped layout)

  def setup(self):
    c = self.cfg
    self.embed = Embed(c.vocab_size, c.hidden_size, name="embed")
    block = nn.remat(Block, prevent_cse=False) if c.remat else Block
    self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast, 0), length=c.num_layers,
                          unroll=c.num_layers if c.unroll_layers else 1,
                          metadata_params={nn.PARTITION_NAME: "layers"})(c, self.dtype)
    self.norm = RMSNorm(c.rms_norm_eps)
    if not c.tie_embeddings:
      self.lm_head = Linear(c.vocab_size, ("embed", "vocab"), dtype=self.dtype,
                            impl=c.lora_impl)

  def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None):
    B, T = tokens_BT.shape
    if positions_BT is None:
      start = 0 if cache is None else cache["end"]
      positions_BT = jnp.broadcast_to(start + jnp.arange(T), (B, T))
    mask = _mask(tokens_BT, segment_ids_BT, cache)
    x = self.embed(tokens_BT, self.dtype)
    layer_cache = None if cache is None else {"k": cache["k"], "v": cache["v"],
                                              "end": jnp.broadcast_to(cache["end"],
                                                                      (self.cfg.num_layers,))}
    cos_sin = rope_tables(positions_BT, jnp.asarray(self.cfg.rope_inv_freq()))
    x, layer_cache = self.layers(x, cos_sin, mask, layer_cache)
    if cache is not None:
      cache = {**cache, "k": layer_cache["k"], "v": layer_cache["v"], "end": cache["end"] + T}
    return self.norm(x), cache

  def logits(self, h_BTD):
    if self.cfg.tie_embeddings:
      # h @ E^T as one dot_general contracting both operands' last axis: written as
      # ``h @ E.T`` (nn.Embed.attend) XLA:CPU materialises the [d, vocab] transpose.
      table = self.embed.table(jnp.float32)
      return jax.lax.dot_general(h_BTD.astype(jnp.float32), table,
                                 (((h_BTD.ndim - 1,), (1,)), ((), ())))
    return self.lm_head(h_BTD).astype(jnp.float32)

  def target_logprobs(self, h_NTD, targets_NT):
    """log p(targets) in f32 from final hidden states: the unembedding's log-softmax at
    each target. A quantised tied table is dequantised ``VOCAB_BLOCK`` rows at a time
    (an online logsumexp over the blocks, each recomputed in the backward pass), so its
    f32 copy ([vocab, d]: 113 MB on SmolLM2, 1 GB at a 1B model's) never exists whole;
    otherwise the full logits (as ``logits``)."""
    if not (self.cfg.tie_embeddings and quant.is_quantized(self.embed.embedding)):
      return -optax.softmax_cross_entropy_with_integer_labels(self.logits(h_NTD), targets_NT)
    h = h_NTD.astype(jnp.float32)
    V, size = self.cfg.vocab_size, min(VOCAB_BLOCK, self.cfg.vocab_size)

    @jax.checkpoint
    def block(carry, i):
      top, total, picked = carry
      ids = i * size + jnp.arange(size)
      logits = jax.lax.dot_general(h, self.embed.rows(i * size, size, jnp.float32),
                                   (((h.ndim - 1,), (1,)), ((), ())))
      logits = jnp.where(ids < V, logits, -jnp.inf)
      new = jnp.maximum(top, jnp.max(logits, axis=-1))
      total = total * jnp.exp(top - new) + jnp.sum(jnp.exp(logits - new[..., None]), -1)
      picked = picked + jnp.sum(jnp.where(ids == targets_NT[..., None], logits, 0.0), -1)
      return (new, total, picked), None

    zeros = jnp.zeros(targets_NT.shape, jnp.float32)
    (top, total, picked), _ = jax.lax.scan(block, (zeros - jnp.inf, zeros, zeros),
                                           jnp.arange(-(-V // size)))
    return picked - top - jnp.log(total)

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None):
    h, cache = self.hidden(tokens_BT, positions_BT, segment_ids_BT, cache)
    return self.logits(h), cache


VOCAB_BLOCK = 8192  # rows of a quantised tied table dequantised at a time (target_logprobs)


def _mask(tokens_BT, segment_ids_BT, cache):
  """[B, T, S] bool: causal over slots, same segment, valid cache slots; None when plain
  causal attention is all that is needed.

  Segment ids: 0 padding, positive ones documents (packed rows: each sees itself only), a
  negative one a shared prefix that every later token of its row sees: RL's grouped layout
  (``layout.training_batch``), one prompt followed by its group's completions, each
  completion seeing the prompt and itself."""
  B, T = tokens_BT.shape
  if cache is None:
    if segment_ids_BT is None:
      return None
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return causal & (same | (segment_ids_BT[:, None, :] < 0))
  S = cache["k"].shape[2]
  q_slot = cache["end"] + jnp.arange(T)
  causal = jnp.arange(S)[None, :] <= q_slot[:, None]  # [T, S]
  return causal[None] & cache["valid"][:, None, :]


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> dict:
  """An empty KV cache with ``slots`` positions per sequence (all slots valid)."""
  shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "valid": jnp.ones((batch, slots), bool), "end": jnp.zeros((), jnp.int32)}


def layouts(cfg: ModelConfig) -> dict[str, str]:
  """Kernel layouts of this model's parameter tree, for ``LoraSpec(layouts=...)``."""
  return {r"^layers/moe/(gate|up|down)_proj/kernel$": "beio",
          r"^layers/.*/kernel$": "bio", r"^lm_head/kernel$": "io"}
