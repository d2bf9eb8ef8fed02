"""Sharded training on 8 fake CPU devices equals one device; specs, accumulation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import jlora
from jlora import models, optim, train
from jlora import sharding as shd
from jlora.models import ModelConfig, Transformer

CFG = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def _batch(seed, rows=8, length=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (rows, length + 1))
  mask = np.ones((rows, length), np.float32)
  mask[:, :3] = 0  # a prompt that carries no loss
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def _setup(mesh, grad_accum=1):
  model = Transformer(CFG)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
  shapes = {p: tuple(x.shape) for p, x in jlora.lora.flatten(nn.unbox(boxed)["params"]).items()}
  specs = shd.logical_specs(boxed["params"])
  param_sh = shd.param_shardings(specs, shapes, mesh)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)))["params"]
  params = shd.place(params, param_sh)
  spec = models.lora_spec(CFG, rank=4, full=("lm_head",))
  ad_sh = shd.adapter_shardings(shapes, specs, spec, mesh)
  adapters = jax.jit(lambda key: jlora.init_adapters(params, spec, key),
                     out_shardings=ad_sh)(jax.random.PRNGKey(1))
  trainable, frozen = optim.trainable(params, adapters, spec)
  tx = optim.optimizer(1e-2)
  state = train.init_state(trainable, tx, mesh)
  step = train.jit_step(train.make_step(model, spec, tx, grad_accum), state, frozen, mesh)
  return step, state, frozen


def _run(mesh, steps=10, grad_accum=1):
  step, state, frozen = _setup(mesh, grad_accum)
  losses = []
  for i in range(steps):
    state, metrics = step(state, frozen, shd.global_batch(_batch(0), mesh))  # memorise one batch
    losses.append(float(metrics["loss"]))
  return np.array(losses), state, step


@pytest.fixture(scope="module")
def single_device():
  return _run(shd.make_mesh(shd.MeshConfig(), jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_losses_equal_one_device(single_device, shape):
  assert len(jax.devices()) == 8
  mesh = shd.make_mesh(shd.MeshConfig(*shape))
  losses, state, _ = _run(mesh)
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5, atol=1e-5)
  assert losses[-1] < losses[0]
  a = state["trainable"]["lora"]["layers"]["attn"]["q_proj"]["kernel"]["a"]
  b = state["trainable"]["lora"]["layers"]["attn"]["q_proj"]["kernel"]["b"]
  down_a = state["trainable"]["lora"]["layers"]["mlp"]["down_proj"]["kernel"]["a"]
  fsdp = "fsdp" if shape[1] > 1 else None
  tensor = "tensor" if shape[2] > 1 else None
  # q_proj kernel [layers, embed, heads]: A keeps (layers, embed), B keeps (layers, heads).
  assert a.sharding.spec == P(None, fsdp, None)
  assert b.sharding.spec == P(None, None, tensor)
  assert down_a.sharding.spec == P(None, tensor, None)   # down_proj input axis is "mlp"
  mu = state["opt_state"].inner_states["lora_a"].inner_state[0].mu
  mu_a = mu["lora"]["layers"]["attn"]["q_proj"]["kernel"]["a"]
  assert mu_a.sharding.is_equivalent_to(a.sharding, a.ndim)  # optimizer state follows A
  head = state["trainable"]["full"]["lm_head"]["kernel"]
  assert head.sharding.spec == P(fsdp, tensor)


def test_no_recompilation_after_first_step(single_device):
  _, _, step = single_device
  assert step._cache_size() == 1


def test_gradient_accumulation_equals_big_batch():
  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
  big, state_big, _ = _run(mesh, steps=3)
  accum, state_acc, _ = _run(mesh, steps=3, grad_accum=4)
  np.testing.assert_allclose(accum, big, rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree_util.tree_leaves(state_big["trainable"]),
                  jax.tree_util.tree_leaves(state_acc["trainable"])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_bad_mesh_and_batch():
  with pytest.raises(ValueError, match="3 devices, but 8 are available"):
    shd.make_mesh(shd.MeshConfig(3, 1, 1))
  with pytest.raises(ValueError, match="do not divide the 8 devices"):
    shd.make_mesh(shd.MeshConfig(-1, 3, 1))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    shd.make_mesh(shd.MeshConfig(-1, -1, 1))
  mesh = shd.make_mesh(shd.MeshConfig(8, 1, 1))
  with pytest.raises(ValueError, match="batch of 6 rows .* not divisible by the 8"):
    shd.global_batch(_batch(0, rows=6), mesh)
