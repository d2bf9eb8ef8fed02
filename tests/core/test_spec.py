"""jlora.core.spec: which kernels a spec targets (presets, regexes, layouts), per-rule rank and
alpha, a plan resolved once, and one-line errors for bad specs and targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core import lora
from tests.flax_models import Mlp, ScannedStack
from tests.helpers import llama_like_params, randomize_b


def mlp_params(key=jax.random.PRNGKey(1)):
  return Mlp().init(key, jnp.ones((2, 8)))["params"]


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


def test_expert_rank_smaller_than_active_experts(rng):
  params = {"experts": {"kernel": jnp.ones((4, 8, 8))}}
  spec = jlora.LoraSpec(2, active_experts=4, layouts={"experts": "eio"})
  with pytest.raises(ValueError, match="smaller than active_experts=4"):
    jlora.init_adapters(params, spec, rng)
