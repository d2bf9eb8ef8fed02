"""The pure tree transform: targets, init, merge/unmerge, counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core import lora
from tests.helpers import max_abs_diff, randomize_b
from tests.models import Mlp, ScannedStack


def mlp_params(key=jax.random.PRNGKey(1)):
  return Mlp().init(key, jnp.ones((2, 8)))["params"]


def llama_like_params(key=jax.random.PRNGKey(2), d=16, f=32, v=20):
  """A parameter tree with the usual decoder names (no model needed for tree tests)."""
  ks = iter(jax.random.split(key, 32))
  n = lambda *s: jax.random.normal(next(ks), s)
  layer = lambda: {
      "attn": {k: {"kernel": n(d, d)} for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
      "mlp": {"gate_proj": {"kernel": n(d, f)}, "up_proj": {"kernel": n(d, f)},
              "down_proj": {"kernel": n(f, d)}},
      "input_norm": {"scale": n(d)},
  }
  return {"embed": {"embedding": n(v, d)}, "layers_0": layer(), "layers_1": layer(),
          "norm": {"scale": n(d)}, "lm_head": {"kernel": n(d, v)}}


def test_presets_select_the_right_kernels():
  params = llama_like_params()
  paths = lambda targets: sorted(lora.resolve(params, jlora.LoraSpec(4, targets=targets)))
  all_ = paths("all")
  assert len(all_) == 14 and not any("lm_head" in p or "embed" in p for p in all_)
  assert all("mlp" in p for p in paths("mlp")) and len(paths("mlp")) == 6
  assert all("attn" in p for p in paths("attn")) and len(paths("attn")) == 8
  assert paths(["all", "lm_head"]) == sorted(all_ + ["lm_head/kernel"])
  assert paths(r"layers_0/.*(q|v)_proj") == ["layers_0/attn/q_proj/kernel",
                                             "layers_0/attn/v_proj/kernel"]


def test_per_rule_rank_and_alpha():
  params = llama_like_params()
  spec = jlora.LoraSpec(8, alpha=32, targets=[jlora.Rule("mlp", rank=2, alpha=4), "attn"])
  t = lora.resolve(params, spec)
  assert t["layers_0/mlp/up_proj/kernel"].rank == 2
  assert t["layers_0/mlp/up_proj/kernel"].scale == 2.0
  assert t["layers_1/attn/q_proj/kernel"].rank == 8
  assert t["layers_1/attn/q_proj/kernel"].scale == 4.0
  rs = lora.resolve(params, jlora.LoraSpec(16, rslora=True))["layers_0/mlp/up_proj/kernel"]
  assert rs.scale == pytest.approx(32 / 4)


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


def test_partition_specs_follow_the_kernel():
  from jax.sharding import PartitionSpec as P
  from jlora.core import sharding
  params = {"layers": {"up": {"kernel": jnp.ones((2, 8, 12))}}}
  plan = lora.plan(params, jlora.LoraSpec(rank=4, layouts={"up": "bio"}))
  specs = sharding.adapter_specs(plan, {"layers/up/kernel": P(None, "fsdp", "tensor")})
  assert specs["layers/up/kernel"] == {"a": P(None, "fsdp", None), "b": P(None, None, "tensor")}


def test_plan_resolves_once_and_stands_for_its_spec():
  params = {"l": {"up": {"kernel": jnp.ones((8, 12))}, "norm": {"scale": jnp.ones(8)}}}
  spec = jlora.LoraSpec(rank=4)
  plan = lora.plan(params, spec)
  assert set(plan.targets) == {"l/up/kernel"} and plan.adapter_params == 4 * (8 + 12)
  adapters = randomize_b(jlora.init_adapters(params, plan, jax.random.PRNGKey(0)),
                         jax.random.PRNGKey(1))
  assert lora.resolve({"x": {"kernel": jnp.ones((3, 3))}}, plan) == plan.targets  # not redone
  seen = lora.with_adapters(params, adapters, plan)["l"]["up"]
  np.testing.assert_allclose(seen["lora_b"], 32 / 4 * adapters["l"]["up"]["kernel"]["b"])
  with pytest.raises(ValueError, match="no matching target"):  # factors checked against it
    lora.with_adapters(params, {"y": {"kernel": adapters["l"]["up"]["kernel"]}}, plan)


def test_works_on_linen_scan_params_with_layouts(rng):
  x = jnp.ones((2, 5, 8))
  variables = ScannedStack().init(rng, x)
  with pytest.raises(ValueError, match="say which axes are inputs"):
    lora.resolve(variables["params"], jlora.LoraSpec(2))
  spec = jlora.LoraSpec(2).with_layouts(jlora.linen_layouts(ScannedStack().apply, variables, x))
  t = lora.resolve(variables["params"], spec)
  assert t["blocks/q/kernel"].layout == "bioo"      # [layers, embed, heads, head_dim]
  assert t["blocks/o/kernel"].layout == "biio"      # [layers, heads, head_dim, embed]
  # "btd,edf->btef": every token meets every expert, so e is an output axis of up_proj
  # and an input axis of down_proj ("btef,efd->btd"), read from the einsums themselves.
  assert t["blocks/up/kernel"].layout == "boio"
  assert t["blocks/down/kernel"].layout == "biio"


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2, alpha=0), "alpha must be > 0"),
    (dict(rank=2, targets=[]), "targets are empty"),
    (dict(rank=2, targets="(unclosed"), "not a valid regex"),
    (dict(rank=2, layouts={"x": "ab"}), "layout 'ab'"),
    (dict(rank=2, dtype=jnp.int32), "dtype must be floating"),
])
def test_bad_spec(kwargs, message):
  with pytest.raises(ValueError, match=message):
    jlora.LoraSpec(**kwargs)


@pytest.mark.parametrize("spec, message", [
    (jlora.LoraSpec(2, targets="mlpp"), "rule 'mlpp' matched no parameter"),
    (jlora.LoraSpec(2, targets=["all", "nothing_here"]), "'nothing_here' matched no"),
    (jlora.LoraSpec(64), "rank 64 exceeds min"),
    (jlora.LoraSpec(2, targets="mlp", full="mlp"), "both a LoRA target and fully trained"),
    (jlora.LoraSpec(2, full="nope"), "full-training rule 'nope' matched no parameter"),
    (jlora.LoraSpec(2, targets="norm"), "rule 'norm' matched no parameter"),
    (jlora.LoraSpec(4, targets="attn", layouts={"q_proj": "eio"}), "layout 'eio' does not fit"),
])
def test_bad_targets(spec, message):
  with pytest.raises(ValueError, match=message):
    lora.resolve(llama_like_params(), spec)


def test_attn_preset_on_a_model_without_attention_names_the_rule(rng):
  with pytest.raises(ValueError, match="rule 'attn' matched no parameter.*Dense_0/kernel"):
    jlora.init_adapters(mlp_params(), jlora.LoraSpec(2, targets="attn"), rng)


def test_non_array_leaf_is_named(rng):
  params = {"dense": {"kernel": jnp.ones((4, 4)), "activation": "relu"}}
  with pytest.raises(ValueError, match="'dense/activation' is a str, not an array"):
    jlora.init_adapters(params, jlora.LoraSpec(2), rng)


def test_expert_rank_smaller_than_active_experts(rng):
  params = {"experts": {"kernel": jnp.ones((4, 8, 8))}}
  spec = jlora.LoraSpec(2, active_experts=4, layouts={"experts": "eio"})
  with pytest.raises(ValueError, match="smaller than active_experts=4"):
    jlora.init_adapters(params, spec, rng)


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
