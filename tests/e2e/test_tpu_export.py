"""TPU readiness without a TPU: the sharded train step and the RL sampler, as ``jlora train``
and ``jlora rl`` build them (LoRA through the Pallas kernel, bf16 base), lower for TPU over a
pod-slice mesh (data 4 x fsdp 2) with ``jax.export``. A change that breaks TPU lowering (a
kernel XLA cannot partition, a Mosaic block shape, an op without a TPU rule) fails here."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from jlora import kernels, models
from jlora.core import lora, optim, sharding
from jlora.infra import mesh as mesh_lib
from jlora.models import ModelConfig, Transformer
from jlora.objectives import lm
from jlora.run import train_step

# Mosaic's block rules need (8, 128)-aligned dims: head_dim 128, d = 256.
CFG = ModelConfig("llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                  num_layers=2, num_heads=2, num_kv_heads=1, head_dim=128,
                  tie_embeddings=True, remat=True, lora_impl="pallas")


MESH = AbstractMesh((4, 2, 1), mesh_lib.AXES)  # a v5e-8 / v4-16 slice: data 4 x fsdp 2


def _abstract(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _run_state(rank=16):
  """(model, plan, trainable, frozen) as abstract arrays carrying the shardings ``setup``
  gives them on ``MESH``: the base bf16, sharded by its logical axes; adapters like their
  kernels."""
  model = Transformer(CFG, dtype=jnp.bfloat16)
  boxed = models.abstract_params(model)
  specs = sharding.logical_specs(boxed)
  arrays = lora.flatten(models.abstract_arrays(model))
  param_sh = sharding.param_shardings(specs, {p: x.shape for p, x in arrays.items()}, MESH)
  params = lora.unflatten({p: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=param_sh[p])
                           for p, x in arrays.items()})
  plan = lora.plan(params, models.lora_spec(CFG, rank))
  adapters = jax.eval_shape(lambda p: lora.init_adapters(p, plan, jax.random.PRNGKey(0)), params)
  adapters = _abstract(adapters, sharding.adapter_shardings(plan, specs, MESH))
  trainable, frozen = optim.trainable(params, adapters, plan)
  return model, plan, trainable, frozen


def _mosaic_calls(exported) -> int:
  """Mosaic kernels in the exported module (each a ``tpu_custom_call``)."""
  return exported.mlir_module().count("tpu_custom_call")


def test_sharded_train_step_exports_for_tpu():
  model, plan, trainable, frozen = _run_state()
  tx = optim.optimizer(1e-4)
  step, state = train_step.build(lm.lm_loss(model, plan, 64), tx, trainable, frozen, MESH)
  batch_sh = mesh_lib.batch_sharding(MESH, 2)
  batch = {k: jax.ShapeDtypeStruct((16, 128), jnp.int32, sharding=batch_sh)
           for k in ("inputs", "targets", "mask", "segment_ids", "positions")}
  with kernels.lowering_for("tpu"):
    exported = jax.export.export(step, platforms=["tpu"])(state, frozen, batch)
  assert exported.platforms == ("tpu",) and exported.nr_devices == 8
  # 7 adapted projections in 3 fused groups (q|k|v, o, gate|up, down: 4 forward calls), each
  # with a forward and a dx kernel, in a scanned layer body and its remat'd backward.
  assert _mosaic_calls(exported) >= 8
  # the adapters stay sharded like their kernels (fsdp on the embed axis), not replicated
  a_q = state["trainable"]["lora"]["layers"]["attn"]["q_proj"]["kernel"]["a"]
  assert a_q.sharding.spec[1] == "fsdp"
  text = exported.mlir_module()
  # Shardy annotations: batch rows over data x fsdp, weights over fsdp, and the Pallas calls
  # inside per-shard (manual) computations, which XLA does not try to partition
  assert '[{"data", "fsdp"}, {}]' in text and '{"fsdp"}' in text
  assert text.count("sdy.manual_computation") >= 4


def test_rl_sampler_exports_for_tpu():
  model, plan, trainable, frozen = _run_state(rank=1)  # RL's rank-1 default
  rows = mesh_lib.batch_sharding(MESH, 2)
  prompts = jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=rows)
  mask = jax.ShapeDtypeStruct((8, 32), jnp.bool_, sharding=rows)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)

  def sample(trainable, frozen, prompts, mask, key):  # what rollouts.Rollouts.sample runs
    return models.sample(model, optim.model_params(trainable, frozen, plan), prompts, mask,
                         key, group=4, max_new_tokens=16, temperature=1.0, eos_id=2, pad=2)
  with kernels.lowering_for("tpu"):
    exported = jax.export.export(jax.jit(mesh_lib.traced_in(sample, MESH)), platforms=["tpu"])(
        trainable, frozen, prompts, mask, key)
  assert exported.nr_devices == 8
  assert _mosaic_calls(exported) >= 4  # prefill and decode step, each q|k|v, o, gate|up, down
  assert exported.mlir_module().count("sdy.manual_computation") >= 4
  tokens = exported.out_avals[0]
  assert tokens.shape == (32, 16)


def test_pallas_on_a_cpu_host_without_a_target_is_an_error():
  with pytest.raises(ValueError, match="needs a TPU or GPU"):
    kernels.selects_pallas("pallas")
  with kernels.lowering_for("tpu"):
    assert kernels.selects_pallas("pallas") and kernels.platform() == "tpu"
  assert kernels.platform() == jax.default_backend()
  with pytest.raises(ValueError, match="lowering_for"):
    with kernels.lowering_for("metal"):
      pass
