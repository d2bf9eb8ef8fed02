"""Tiny random transformers checkpoints written with save_pretrained (torch required)."""

import os

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def save_tiny(kind: str, out_dir: str, seed: int = 0, **overrides) -> str:
  """Write a tiny random HF checkpoint of ``kind`` (llama, llama_tied, qwen3, qwen3_moe)."""
  import torch
  import transformers as tf
  torch.manual_seed(seed)
  kw = dict(TINY, **overrides)
  if kind.startswith("llama"):
    cfg = tf.LlamaConfig(**kw, tie_word_embeddings=kind == "llama_tied",
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 32})
    model = tf.LlamaForCausalLM(cfg)
  elif kind == "qwen3":
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**kw, head_dim=16))
  elif kind == "qwen3_moe":
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        **kw, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        norm_topk_prob=True))
  else:
    raise ValueError(kind)
  with torch.no_grad():  # HF inits norms to 1: randomise them so the test sees them
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  path = os.path.join(out_dir, kind)
  model.save_pretrained(path)
  return path


def hf_logits(path: str, tokens):
  import torch
  import transformers as tf
  model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()
