"""jlora.models.transformer: logits equal transformers' (Llama, Qwen3, Qwen3-MoE), the LoRA
forward equals the merged one, packed segments do not attend across, remat changes
nothing."""

import jax
import numpy as np
import pytest

import jlora
from jlora import models
from tests.helpers import CFG, HF_KINDS, random_tokens, randomize_b, train_one_batch
from tests.hf_models import hf_logits


@pytest.mark.parametrize("kind", HF_KINDS)
def test_logits_match_transformers(hf_checkpoints, kind):
  model, params, cfg = models.load(hf_checkpoints[kind])
  tokens = random_tokens()
  ours, _ = jax.jit(model.apply)({"params": params}, tokens)
  theirs = hf_logits(hf_checkpoints[kind], tokens)
  assert np.max(np.abs(np.asarray(ours) - theirs)) <= 1e-4
  assert np.std(theirs) > 1e-2  # the logits vary: a model that is all zeros would fail above
  assert cfg.is_moe == (kind == "qwen3_moe") and cfg.tie_embeddings == (kind == "llama_tied")


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_lora_forward_equals_merged_forward(hf_checkpoints, kind):
  model, params, cfg = models.load(hf_checkpoints[kind])
  spec = models.lora_spec(cfg, rank=4)
  adapters = randomize_b(jlora.init_adapters(params, spec, jax.random.PRNGKey(0)),
                         jax.random.PRNGKey(1))
  if cfg.is_moe:  # rank per expert = rank // experts_per_token
    assert adapters["layers"]["moe"]["up_proj"]["kernel"]["a"].shape == (2, 4, 32, 2)
  tokens = random_tokens()
  lora_params = jlora.core.lora.with_adapters(params, adapters, spec)
  forward = jax.jit(model.apply)
  y_lora, _ = forward({"params": lora_params}, tokens)
  y_merged, _ = forward({"params": jlora.merge(params, adapters, spec)}, tokens)
  y_base, _ = forward({"params": params}, tokens)
  assert np.max(np.abs(y_lora - y_base)) > 1e-3
  np.testing.assert_allclose(y_lora, y_merged, atol=1e-4)


def test_packed_segments_do_not_attend_across(hf_checkpoints):
  model, params, _ = models.load(hf_checkpoints["qwen3"])
  a, b = random_tokens(1, 12, seed=1), random_tokens(1, 20, seed=2)
  packed = np.concatenate([a, b], axis=1)
  segments = np.array([[1] * 12 + [2] * 20])
  positions = np.array([list(range(12)) + list(range(20))])
  y_packed, _ = model.apply({"params": params}, packed, positions, segments)
  y_a, _ = model.apply({"params": params}, a)
  y_b, _ = model.apply({"params": params}, b)
  np.testing.assert_allclose(y_packed[:, :12], y_a, atol=1e-5)
  np.testing.assert_allclose(y_packed[:, 12:], y_b, atol=1e-5)
  y_leaky, _ = model.apply({"params": params}, packed, positions)  # b attends to a
  assert np.max(np.abs(y_leaky[:, 12:] - y_b)) > 1e-2


def test_remat_gives_the_same_steps():
  m1, s1, initial = train_one_batch(CFG, steps=3)
  m2, s2, _ = train_one_batch(CFG.replace(remat=True), steps=3)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  assert m1["loss"][0] - m1["loss"][-1] > 0.3
  moved = jax.tree_util.tree_map(lambda x, x0: float(np.max(np.abs(x - x0))),
                                 s1["trainable"]["lora"], initial["lora"])
  assert min(jax.tree_util.tree_leaves(moved)) > 1e-3  # every A and B was updated
  for x, y in zip(jax.tree_util.tree_leaves(s1["trainable"]),
                  jax.tree_util.tree_leaves(s2["trainable"])):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_a_quantised_tied_table_unembeds_a_vocabulary_block_at_a_time(tmp_path, monkeypatch,
                                                                    fmt):
  """``target_logprobs`` over a quantised tied table, in blocks of 48 rows of a 320-token
  vocabulary (the last block partly past the end): the log-softmax of h against the whole
  dequantised table (numpy, float64), and its gradient w.r.t. h (by the softmax's
  formula)."""
  import jax.numpy as jnp
  from jlora.models import transformer
  from tests.helpers import QUANT_SIZES, tiny_model_dir
  monkeypatch.setattr(transformer, "VOCAB_BLOCK", 48)
  path = tiny_model_dir(str(tmp_path), "llama_tied", **QUANT_SIZES)
  model, params, cfg = models.load(path, quantize="nf4", quantize_embeddings=fmt)
  assert cfg.tie_embeddings and cfg.vocab_size % 48  # the last block partly past the end
  table = np.asarray(params["embed"]["embedding"].dequantize(jnp.float32), np.float64)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 5, cfg.hidden_size)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 5)))
  fn = jax.jit(lambda h: model.apply({"params": params}, h, targets,
                                     method="target_logprobs"))
  logits = np.asarray(h, np.float64) @ table.T
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                         keepdims=True)) - logits.max(-1, keepdims=True)
  want = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(fn(h), want, rtol=1e-5, atol=1e-5)
  # d sum(log p(t)) / dh = E[t] - softmax(h E^T) E, per position
  grad = np.asarray(jax.grad(lambda h: jnp.sum(fn(h)))(h))
  want_grad = table[np.asarray(targets)] - np.exp(logp) @ table
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)
