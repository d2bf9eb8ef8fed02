"""jlora.study.compute: the FLOP difference between LoRA and FullFT is the weight gradients."""



def test_compute_flops_difference_is_the_weight_gradients():
  """FullFT minus rank-1 LoRA gradient FLOPs ~ the gradient matmuls of the weights only
  FullFT trains, 2 x tokens x weights, counted independently from the shapes: the layer's
  projections, the unembedding, and the embedding (whose gradient XLA counts as a
  matmul's)."""
  from jlora.study import compute
  cfg = compute.layer_config(256)
  tokens = compute.SEQ
  lora_f, full_f = compute.xla_flops(cfg, 1, tokens, rank=1)
  d, f = cfg.hidden_size, cfg.intermediate_size
  q = d * cfg.num_heads * cfg.head_dim
  kv = d * cfg.num_kv_heads * cfg.head_dim
  weights = 2 * q + 2 * kv + 3 * d * f
  expected = 2 * tokens * (weights + 2 * cfg.vocab_size * d)
  assert 0.95 < (full_f - lora_f) / expected < 1.05
  assert 0.6 < lora_f / full_f < 0.8
