"""jlora.core.sharding: training sharded over 8 fake CPU devices (data, fsdp, tensor) equals one
device, through XLA and the interpreted Pallas kernels; adapter specs follow their kernel;
no recompilation after the first step."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from jlora.core import lora
from jlora.infra import mesh as mesh_lib
from tests.helpers import CFG, run_steps, sharded_setup, tiny_batch


def test_partition_specs_follow_the_kernel():
  from jax.sharding import PartitionSpec as P

  from jlora.core import sharding
  params = {"layers": {"up": {"kernel": jnp.ones((2, 8, 12))}}}
  plan = lora.plan(params, jlora.LoraSpec(rank=4, layouts={"up": "bio"}))
  specs = sharding.adapter_specs(plan, {"layers/up/kernel": P(None, "fsdp", "tensor")})
  assert specs["layers/up/kernel"] == {"a": P(None, "fsdp", None), "b": P(None, None, "tensor")}


@pytest.fixture(scope="module")
def single_device():
  return run_steps(mesh_lib.make_mesh(mesh_lib.MeshConfig(), jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_losses_equal_one_device(single_device, shape):
  assert len(jax.devices()) == 8
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*shape))
  metrics, state, _ = run_steps(mesh)
  losses = metrics["loss"]
  np.testing.assert_allclose(losses, single_device[0]["loss"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], single_device[0]["grad_norm"], rtol=1e-4)
  assert losses[0] - losses[-1] > 1.0  # it learns: a model that does not stays at ~log(64)
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


def test_pallas_kernel_sharded_trains_like_xla_on_one_device(single_device):
  """model.lora_impl="interpret" (the Pallas kernels, interpreted on CPU) on data 2 x fsdp 2
  x tensor 2: each batch shard runs the kernel on its rows (shard_map, as on a TPU pod or
  GPUs, where XLA cannot partition a Mosaic/Triton call) and the steps equal one device's
  XLA steps (autodiff, no kernel)."""
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 2))
  metrics, state, step = run_steps(mesh, steps=3, cfg=CFG.replace(lora_impl="interpret"))
  np.testing.assert_allclose(metrics["loss"], single_device[0]["loss"][:3], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], single_device[0]["grad_norm"][:3],
                             rtol=1e-4)
  text = step.lower(state, *sharded_setup(mesh, cfg=CFG.replace(lora_impl="interpret"))[2:],
                    mesh_lib.global_batch(tiny_batch(0), mesh)).as_text()
  assert "shard_map" in text or "manual_computation" in text


def test_no_recompilation_after_first_step(single_device):
  _, _, step = single_device
  assert step._cache_size() == 1
