"""jlora.core.stack: N adapters with different ranks, alphas and targets stacked over one
base. Each adapter's slice starts as its solo adapter; a model run with the stack gives
each row its own adapter's logits and gradients (against N solo models); padded and
untargeted slices get exactly zero gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import models
from jlora.core import lora, matmul, stack
from jlora.models import Transformer
from tests.helpers import CFG, randomize_b

SPECS = [models.lora_spec(CFG, rank=2),  # all kernels
         models.lora_spec(CFG, rank=4, alpha=16.0, targets="attn"),
         models.lora_spec(CFG, rank=1, alpha=8.0, targets="mlp", rslora=True)]


@pytest.fixture(scope="module")
def base():
  model = Transformer(CFG)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
  params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                  is_leaf=lambda x: hasattr(x, "value"))
  st = stack.stack(params, SPECS)
  solos = [randomize_b(lora.init_adapters(params, p, jax.random.PRNGKey(10 + i)),
                       jax.random.PRNGKey(20 + i), 0.3) for i, p in enumerate(st.plans)]
  return model, params, st, solos


def test_init_holds_each_solo_adapter_and_unstacks_to_it(base):
  _, params, st, _ = base
  keys = [jax.random.PRNGKey(i) for i in range(3)]
  stacked = stack.init_adapters(params, st, keys)
  for i, (p, k) in enumerate(zip(st.plans, keys)):
    solo = lora.adapter_leaves(lora.init_adapters(params, p, k))
    got = lora.adapter_leaves(stack.unstack(stacked, st, i))
    assert got.keys() == solo.keys()
    for path in solo:
      for name in ("a", "b"):
        np.testing.assert_array_equal(got[path][name], solo[path][name])
  q = "layers/attn/q_proj/kernel"  # [layers, in, out]: A [layers, N, in, r_max]
  a = lora.adapter_leaves(stacked)[q]["a"]
  assert a.shape == (CFG.num_layers, 3, CFG.hidden_size, 4)
  assert not np.any(a[:, 0, :, 2:]) and not np.any(a[:, 2])  # rank 2 padded; mlp-only
  up = lora.adapter_leaves(stacked)["layers/mlp/up_proj/kernel"]["a"]
  assert not np.any(up[:, 1])  # attention-only adapter: zeros on MLP kernels


def _logits(model, params, tokens):
  return model.apply({"params": params}, tokens)[0]


def test_each_row_runs_its_own_adapter(base):
  model, params, st, solos = base
  stacked = stack.stack_adapters(solos, st)
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (6, 10))
  with matmul.adapter_rows((2, 2, 2)):  # rows grouped by adapter
    got = _logits(model, stack.with_adapters(params, stacked, st), tokens)
  for i, (p, solo) in enumerate(zip(st.plans, solos)):
    want = _logits(model, lora.with_adapters(params, solo, p), tokens[2 * i:2 * i + 2])
    np.testing.assert_allclose(got[2 * i:2 * i + 2], want, rtol=1e-5, atol=1e-5)
  plain = _logits(model, params, tokens[:2])
  assert np.max(np.abs(got[:2] - plain)) > 1e-3  # the adapters change the logits


def test_gradients_per_adapter_equal_solo_and_padding_gets_none(base):
  model, params, st, solos = base
  stacked = stack.stack_adapters(solos, st)
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (6, 10))

  def stacked_loss(adapters):
    with matmul.adapter_rows((2, 2, 2)):
      logits = _logits(model, stack.with_adapters(params, adapters, st), tokens)
    return jnp.sum(logits ** 2) * 1e-3

  grads = jax.grad(stacked_loss)(stacked)
  for i, (p, solo) in enumerate(zip(st.plans, solos)):
    def solo_loss(adapters):
      rows = tokens[2 * i:2 * i + 2]
      return jnp.sum(_logits(model, lora.with_adapters(params, adapters, p), rows) ** 2) * 1e-3
    want = lora.adapter_leaves(jax.grad(solo_loss)(solo))
    got = lora.adapter_leaves(stack.unstack(grads, st, i))
    for path in want:
      for name in ("a", "b"):
        np.testing.assert_allclose(got[path][name], want[path][name], rtol=1e-4, atol=1e-6)
  g = lora.adapter_leaves(grads)
  q, up = g["layers/attn/q_proj/kernel"], g["layers/mlp/up_proj/kernel"]
  assert not np.any(q["a"][:, 0, :, 2:]) and not np.any(q["b"][:, 0, 2:])  # past rank 2
  assert not np.any(q["a"][:, 2]) and not np.any(q["b"][:, 2])  # mlp-only adapter
  assert not np.any(up["a"][:, 1]) and not np.any(up["b"][:, 1])  # attention-only adapter


def test_stack_errors_are_one_line(base):
  model, params, st, solos = base
  with pytest.raises(ValueError, match="cannot be stacked"):
    stack.stack(params, [lora.LoraSpec(rank=2, full=("embed",)).with_layouts(
        dict(models.layouts(CFG)))])
  with pytest.raises(ValueError, match="need each adapter's rows"):
    _logits(model, stack.with_adapters(params, stack.stack_adapters(solos, st), st),
            np.zeros((2, 4), np.int32))
