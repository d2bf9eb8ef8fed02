"""The decoder configuration shared by Llama 3, Qwen 3 and Qwen 3 MoE, read from an HF
``config.json`` (transformers 4 or 5 keys) or from GGUF metadata."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

ARCHITECTURES = {  # HF model_type -> family
    "llama": "llama", "mistral": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer hyper-parameters.

  Attributes:
    model_type: HF model_type ("llama", "qwen3", "qwen3_moe").
    vocab_size, hidden_size, intermediate_size, num_layers: the usual sizes.
    num_heads, num_kv_heads, head_dim: attention (GQA when num_kv_heads < num_heads).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base.
    rope_scaling: Llama-3 frequency scaling as (factor, low_freq_factor,
      high_freq_factor, original_max_position_embeddings), or None.
    tie_embeddings: the unembedding is the transposed token embedding.
    qk_norm: RMSNorm on q and k per head before RoPE (Qwen 3).
    attention_bias: biases on q/k/v/o projections.
    num_experts: MoE experts per layer (0: dense MLP).
    experts_per_token: experts routed per token (top-k).
    moe_intermediate_size: hidden size of each expert.
    norm_topk_prob: renormalise the top-k routing weights to sum to 1.
    max_position_embeddings: the context the model was trained for.
    remat: rematerialise each layer's activations in the backward pass.
    unroll_layers: unroll the layer scan (same stacked parameters, per-layer slices
      static to XLA; a longer compile).
    lora_impl: how adapted projections run (``jlora.kernels.IMPLS``): "xla" (the default
      path: XLA matmuls through ``jlora.core.matmul``, differentiated by JAX), or "auto" /
      "pallas" / "interpret" (the fused ``jlora.kernels.lora_matmul``).
  """
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[float, float, float, int] | None = None
  tie_embeddings: bool = False
  qk_norm: bool = False
  attention_bias: bool = False
  num_experts: int = 0
  experts_per_token: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False
  max_position_embeddings: int = 8192
  remat: bool = False
  unroll_layers: bool = False
  lora_impl: str = "xla"

  def __post_init__(self):
    if self.model_type not in ARCHITECTURES:
      raise ValueError(f"unknown architecture {self.model_type!r}; supported: "
                       f"{', '.join(sorted(ARCHITECTURES))}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"model config {name} must be >= 1, got {getattr(self, name)}")
    from jlora.kernels import IMPLS
    if self.lora_impl not in IMPLS:
      raise ValueError(f"lora_impl {self.lora_impl!r} is not one of {', '.join(IMPLS)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
      raise ValueError(f"experts_per_token must be in [1, {self.num_experts}], got "
                       f"{self.experts_per_token}")

  @property
  def family(self) -> str:
    return ARCHITECTURES[self.model_type]

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
    """From a transformers ``config.json`` dict (v4 ``rope_scaling`` or v5
    ``rope_parameters``)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
      raise ValueError(f"{source}: unknown architecture {model_type!r} "
                       f"(architectures={hf.get('architectures')}); supported model_type: "
                       f"{', '.join(sorted(ARCHITECTURES))}")
    try:
      rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
      theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
      rope_type = rope.get("rope_type", rope.get("type", "default"))
      if rope_type not in ("default", "llama3"):
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported "
                         "(default, llama3)")
      scaling = None
      if rope_type == "llama3":
        scaling = (float(rope["factor"]), float(rope["low_freq_factor"]),
                   float(rope["high_freq_factor"]),
                   int(rope["original_max_position_embeddings"]))
      heads = hf["num_attention_heads"]
      num_experts = hf.get("num_experts", hf.get("num_local_experts", 0)) or 0
      if model_type == "qwen3_moe" and (hf.get("mlp_only_layers") or
                                        hf.get("decoder_sparse_step", 1) != 1):
        raise ValueError(f"{source}: mixed dense/MoE layers (mlp_only_layers, "
                         "decoder_sparse_step) are not supported")
      return cls(
          model_type=model_type,
          vocab_size=hf["vocab_size"],
          hidden_size=hf["hidden_size"],
          intermediate_size=hf["intermediate_size"],
          num_layers=hf["num_hidden_layers"],
          num_heads=heads,
          num_kv_heads=hf.get("num_key_value_heads") or heads,
          head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
          rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
          rope_theta=float(theta),
          rope_scaling=scaling,
          tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
          qk_norm=model_type in ("qwen3", "qwen3_moe"),
          attention_bias=bool(hf.get("attention_bias", False)),
          num_experts=num_experts if model_type == "qwen3_moe" else 0,
          experts_per_token=hf.get("num_experts_per_tok", 0) if model_type == "qwen3_moe" else 0,
          moe_intermediate_size=hf.get("moe_intermediate_size", 0),
          norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
          max_position_embeddings=hf.get("max_position_embeddings", 8192),
      )
    except KeyError as e:
      raise ValueError(f"{source}: missing key {e.args[0]!r}") from None

  def to_hf(self) -> dict[str, Any]:
    """The transformers ``config.json`` for this model (for merged-checkpoint export)."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[self.model_type]
    rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling:
      f, lo, hi, orig = self.rope_scaling
      rope.update(rope_type="llama3", factor=f, low_freq_factor=lo, high_freq_factor=hi,
                  original_max_position_embeddings=orig)
    out = {"architectures": [arch], "model_type": self.model_type,
           "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
           "intermediate_size": self.intermediate_size,
           "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
           "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
           "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
           "rope_parameters": rope, "rope_scaling": rope if self.rope_scaling else None,
           "tie_word_embeddings": self.tie_embeddings,
           "attention_bias": self.attention_bias,
           "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu"}
    if self.is_moe:
      out.update(num_experts=self.num_experts, num_experts_per_tok=self.experts_per_token,
                 moe_intermediate_size=self.moe_intermediate_size,
                 norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=1,
                 mlp_only_layers=[])
    return out

  def rope_inv_freq(self):
    """RoPE inverse frequencies (HF rotate-half layout), with Llama-3 scaling if set."""
    import numpy as np
    inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64)
                                     / self.head_dim))
    if self.rope_scaling is None:
      return inv.astype(np.float32)
    factor, low, high, orig = self.rope_scaling
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = orig / low, orig / high
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
