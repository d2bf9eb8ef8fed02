"""jlora.core.flax_apply: ``jlora.apply`` / ``apply_nnx`` on unmodified Flax models (linen,
scan, nnx): the LoRA forward and gradients equal the merged model's."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jlora
from jlora.core import lora
from tests.flax_models import Mlp, NnxModel, ScannedStack
from tests.helpers import max_abs_diff, randomize_b


def _kernel_shapes(params, spec):
  return {t.shape for t in lora.resolve(params, spec).values()}


def _materialised_shapes(fn, *args):
  """Output shapes of every equation in fn's jaxpr (recursing into scans/pjits)."""
  shapes = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def test_linen_mlp_forward_equals_merged(rng):
  model, x = Mlp(hidden=24, out=5), jax.random.normal(rng, (7, 3, 9))
  variables = model.init(jax.random.PRNGKey(1), x)
  spec = jlora.LoraSpec(rank=4)
  adapters = randomize_b(jlora.init_adapters(variables["params"], spec, rng), rng)
  y_lora = jlora.apply(model.apply, variables, adapters, spec, x)
  y_merged = model.apply({"params": jlora.merge(variables["params"], adapters, spec)}, x)
  y_base = model.apply(variables, x)
  assert max_abs_diff(y_lora, y_base) > 1e-3           # the adapter does something
  assert max_abs_diff(y_lora, y_merged) < 1e-5
  shapes = _materialised_shapes(lambda ad: jlora.apply(model.apply, variables, ad, spec, x),
                                adapters)
  assert not shapes & _kernel_shapes(variables["params"], spec), "W + BA materialised"


def test_linen_mlp_gradients_equal_merged(rng):
  model, x = Mlp(), jax.random.normal(rng, (4, 8))
  variables = model.init(jax.random.PRNGKey(1), x)
  spec = jlora.LoraSpec(rank=2)
  adapters = randomize_b(jlora.init_adapters(variables["params"], spec, rng), rng)
  loss_lora = lambda ad: jnp.sum(jlora.apply(model.apply, variables, ad, spec, x) ** 2)
  loss_merged = lambda ad: jnp.sum(
      model.apply({"params": jlora.merge(variables["params"], ad, spec)}, x) ** 2)
  g_lora, g_merged = jax.grad(loss_lora)(adapters), jax.grad(loss_merged)(adapters)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_merged))
  assert max_abs_diff(g_lora, g_merged) / scale < 1e-5


def test_linen_scan_dense_general_and_einsum(rng):
  model, x = ScannedStack(), jax.random.normal(rng, (2, 5, 8))
  variables = model.init(jax.random.PRNGKey(1), x)
  spec = jlora.LoraSpec(rank=3).with_layouts(jlora.linen_layouts(model.apply, variables, x))
  adapters = randomize_b(jlora.init_adapters(variables["params"], spec, rng), rng)
  assert adapters["blocks"]["q"]["kernel"]["a"].shape == (2, 8, 3)      # per scanned layer
  assert adapters["blocks"]["o"]["kernel"]["a"].shape == (2, 2, 8, 3)   # [L, heads, hd, r]
  y_lora = jax.jit(lambda ad: jlora.apply(model.apply, variables, ad, spec, x))(adapters)
  y_merged = model.apply({"params": jlora.merge(variables["params"], adapters, spec)}, x)
  assert max_abs_diff(y_lora, model.apply(variables, x)) > 1e-3
  assert max_abs_diff(y_lora, y_merged) < 1e-5


def test_linen_adapter_on_unsupported_layer_is_an_error(rng):
  class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3,))(x)

  x = jnp.ones((1, 6, 2))
  variables = Conv().init(rng, x)
  spec = jlora.LoraSpec(rank=1, layouts={"kernel": "bio"})
  adapters = jlora.init_adapters(variables["params"], spec, rng)
  with pytest.raises(ValueError, match="'Conv_0' was not applied"):
    jlora.apply(Conv().apply, variables, adapters, spec, x)


def test_nnx_model_forward_equals_merged(rng):
  model = NnxModel(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  spec = jlora.LoraSpec(rank=2).with_layouts(jlora.nnx_layouts(model))
  adapters = randomize_b(jlora.init_adapters(state, spec, rng), rng)
  assert set(adapters) == {"inp", "layers", "heads", "mix", "out"}
  x = jax.random.normal(rng, (6, 8))
  y_lora = jax.jit(lambda ad: jlora.apply_nnx(graphdef, state, ad, spec, x))(adapters)
  merged = nnx.merge(graphdef, jlora.merge(state, adapters, spec))
  assert max_abs_diff(y_lora, model(x)) > 1e-3
  assert max_abs_diff(y_lora, merged(x)) < 1e-5
  assert isinstance(model.inp, nnx.Linear)  # the caller's module is untouched
  shapes = _materialised_shapes(lambda ad: jlora.apply_nnx(graphdef, state, ad, spec, x),
                                adapters)
  assert not shapes & _kernel_shapes(state, spec)


def test_nnx_merge_at_init_is_exact(rng):
  model = NnxModel(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  spec = jlora.LoraSpec(rank=2).with_layouts(jlora.nnx_layouts(model))
  merged = jlora.merge(state, jlora.init_adapters(state, spec, rng), spec)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
