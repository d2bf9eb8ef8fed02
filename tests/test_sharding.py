"""Sharded training on 8 fake CPU devices equals one device; specs, accumulation, errors."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
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
  plan = jlora.lora.plan(params, models.lora_spec(CFG, rank=4, full=("lm_head",)))
  ad_sh = shd.adapter_shardings(plan, specs, mesh)
  adapters = jax.jit(lambda key: jlora.init_adapters(params, plan, key),
                     out_shardings=ad_sh)(jax.random.PRNGKey(1))
  trainable, frozen = optim.trainable(params, adapters, plan)
  tx = optim.optimizer(1e-2)
  state = train.init_state(trainable, tx, mesh)
  step = train.jit_step(train.make_step(train.lm_loss(model, plan), tx, grad_accum), state,
                        frozen, mesh)
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


def _worker_env():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return env


def test_two_processes_match_one_process(tmp_path):
  """2 local processes x 2 devices (gloo) train 5 steps like one process on 4 devices."""
  port = portpicker.pick_unused_port()
  outs = [tmp_path / f"p{i}.json" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(i),
                             str(port), str(outs[i]), "5"], env=_worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0].decode()[-2000:] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), logs
  results = [json.load(open(o)) for o in outs]
  assert results[0]["devices"] == 4 and results[0]["local_devices"] == 2
  reference, _, _ = _run(shd.make_mesh(shd.MeshConfig(data=-1), jax.devices()[:4]), steps=5)
  for r in results:
    np.testing.assert_allclose(r["losses"], reference, rtol=1e-5, atol=1e-5)


def test_unreachable_coordinator_is_a_clear_error():
  port = portpicker.pick_unused_port()
  code = ("import jax; jax.config.update('jax_platforms', 'cpu');"
          "from jlora import sharding as s;"
          f"s.initialize('127.0.0.1:{port}', 2, 1, timeout_s=5)")
  start = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", code], env=_worker_env(), capture_output=True,
                        timeout=120)
  assert proc.returncode != 0
  assert "could not join the distributed runtime at coordinator" in proc.stderr.decode()
  assert time.monotonic() - start < 90


def _loss_and_grads(cfg, dtype=jnp.float32):
  model = Transformer(cfg, dtype=dtype)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)))["params"]
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  spec = models.lora_spec(cfg, rank=4)
  adapters = jlora.init_adapters(params, spec, jax.random.PRNGKey(1))
  trainable, frozen = optim.trainable(params, adapters, spec)
  step = train.make_step(train.lm_loss(model, spec), optim.optimizer(1e-2))
  mesh = shd.make_mesh(shd.MeshConfig(), jax.devices()[:1])
  state = train.init_state(trainable, optim.optimizer(1e-2), mesh)
  batch = {k: jnp.asarray(v) for k, v in _batch(0).items()}
  new, metrics = jax.jit(step)(state, frozen, batch)
  return metrics, new


def test_remat_gives_the_same_step():
  m1, s1 = _loss_and_grads(CFG)
  m2, s2 = _loss_and_grads(CFG.replace(remat=True))
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)


def test_bf16_base_keeps_adapters_and_optimizer_in_f32():
  m32, _ = _loss_and_grads(CFG)
  m16, state = _loss_and_grads(CFG, jnp.bfloat16)
  leaves = jax.tree_util.tree_leaves(state["trainable"]) + [
      x for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim]
  assert all(x.dtype == jnp.float32 for x in leaves)
  assert m16["loss"].dtype == jnp.float32
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
