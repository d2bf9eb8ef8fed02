"""jlora.core.lora: the pure tree transform: init (as PEFT), merge/unmerge, stacked and expert
layouts, per-kernel RNG, counts and description, mismatched adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core import lora
from tests.helpers import llama_like_params, max_abs_diff, randomize_b


def test_init_matches_peft_and_merge_at_init_is_exact(rng):
  params = llama_like_params()
  spec = jlora.LoraSpec(rank=4)
  adapters = jlora.init_adapters(params, spec, rng)
  a = adapters["layers_0"]["mlp"]["down_proj"]["kernel"]["a"]
  assert a.shape == (32, 4) and a.dtype == jnp.float32
  bound = 1 / np.sqrt(32)
  assert float(jnp.max(jnp.abs(a))) <= bound and float(jnp.max(jnp.abs(a))) > 0.8 * bound
  assert not jnp.any(adapters["layers_0"]["mlp"]["down_proj"]["kernel"]["b"])
  merged = jlora.merge(params, adapters, spec)
  for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(merged)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_merge_unmerge_round_trip(rng):
  params = llama_like_params()
  spec = jlora.LoraSpec(rank=4, targets="all")
  adapters = randomize_b(jlora.init_adapters(params, spec, rng), jax.random.PRNGKey(3))
  merged = jlora.merge(params, adapters, spec)
  assert max_abs_diff(merged, params) > 1e-3
  assert max_abs_diff(jlora.unmerge(merged, adapters, spec), params) < 1e-6


def test_merge_delta_is_scale_times_ab(rng):
  params = {"dense": {"kernel": jnp.zeros((6, 5))}}
  spec = jlora.LoraSpec(rank=3, alpha=6.0)
  adapters = randomize_b(jlora.init_adapters(params, spec, rng), rng)
  ab = adapters["dense"]["kernel"]
  np.testing.assert_allclose(jlora.merge(params, adapters, spec)["dense"]["kernel"],
                             2.0 * ab["a"] @ ab["b"], rtol=1e-6, atol=1e-7)


def test_stacked_and_expert_layouts(rng):
  params = {"layers": {"mlp": {"kernel": jnp.ones((3, 8, 12))}},
            "moe": {"experts": {"kernel": jnp.ones((4, 8, 12))}}}
  spec = jlora.LoraSpec(rank=4, targets="all", active_experts=2,
                        layouts={"layers/": "bio", "experts": "eio"})
  t = lora.resolve(params, spec)
  assert t["layers/mlp/kernel"].a_shape == (3, 8, 4)
  assert t["layers/mlp/kernel"].b_shape == (3, 4, 12)
  assert t["moe/experts/kernel"].rank == 2  # rank per expert = rank // active experts
  assert t["moe/experts/kernel"].a_shape == (4, 8, 2)
  adapters = randomize_b(jlora.init_adapters(params, spec, rng), rng)
  merged = jlora.merge(params, adapters, spec)
  ab = adapters["layers"]["mlp"]["kernel"]
  for layer in range(3):  # one independent adapter per stacked slice
    np.testing.assert_allclose(merged["layers"]["mlp"]["kernel"][layer],
                               1 + 8.0 * ab["a"][layer] @ ab["b"][layer], rtol=1e-5)


def test_rng_per_kernel_is_stable_when_targets_change(rng):
  params = llama_like_params()
  few = jlora.init_adapters(params, jlora.LoraSpec(4, targets="mlp"), rng)
  many = jlora.init_adapters(params, jlora.LoraSpec(4, targets="all"), rng)
  np.testing.assert_array_equal(few["layers_1"]["mlp"]["up_proj"]["kernel"]["a"],
                                many["layers_1"]["mlp"]["up_proj"]["kernel"]["a"])


def test_init_under_jit_on_shapes_only(rng):
  params = llama_like_params()
  shapes = jax.eval_shape(lambda: params)
  spec = jlora.LoraSpec(4)
  jitted = jax.jit(lambda key: jlora.init_adapters(shapes, spec, key))(rng)
  eager = jlora.init_adapters(params, spec, rng)
  assert max_abs_diff(jitted, eager) == 0.0


def test_counts_and_describe(rng):
  params = llama_like_params()
  spec = jlora.LoraSpec(rank=4, targets="mlp")
  adapters = jlora.init_adapters(params, spec, rng)
  assert jlora.count_params(adapters) == 2 * 3 * 4 * (16 + 32)
  desc = jlora.describe(params, spec)
  assert desc.adapter_params == jlora.count_params(adapters)
  assert desc.base_params == jlora.count_params(params)
  text = str(desc)
  assert "layers_0/mlp/down_proj/kernel" in text and "6 kernels" in text


def test_non_array_leaf_is_named(rng):
  params = {"dense": {"kernel": jnp.ones((4, 4)), "activation": "relu"}}
  with pytest.raises(ValueError, match="'dense/activation' is a str, not an array"):
    jlora.init_adapters(params, jlora.LoraSpec(2), rng)


def test_mismatched_adapters_are_named(rng):
  params = llama_like_params()
  spec = jlora.LoraSpec(4, targets="mlp")
  adapters = jlora.init_adapters(params, spec, rng)
  adapters["layers_0"]["mlp"]["up_proj"]["kernel"]["a"] = jnp.ones((16, 3))
  with pytest.raises(ValueError, match="adapter for 'layers_0/mlp/up_proj/kernel' has A"):
    jlora.merge(params, adapters, spec)
  extra = jlora.init_adapters(params, jlora.LoraSpec(4, targets="all"), rng)
  with pytest.raises(ValueError, match="no matching target"):
    jlora.merge(params, extra, spec)
