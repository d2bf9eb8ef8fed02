"""jlora.kernels.dispatch: one set of implementation names, ``auto`` not Pallas until measured
faster, one-line errors, and a whole model's training steps through the interpreted
kernels equal to the models' XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jlora
from jlora import kernels, models
from jlora.core import matmul as matmul_lib
from jlora.core import optim
from jlora.infra import mesh as mesh_lib
from jlora.models import ModelConfig, Transformer
from jlora.objectives import lm
from jlora.run import train_step
from tests.helpers import CFG, matmul_inputs, randomize_b


def test_bad_arguments():
  x, w, a, b = matmul_inputs(0, 8, 16, 24, 4)
  with pytest.raises(ValueError, match="lora_impl 'fast': expected one of auto, xla"):
    kernels.lora_matmul(x, w, a, b, impl="fast")
  with pytest.raises(ValueError, match="needs a TPU or GPU"):
    kernels.lora_matmul(x, w, a, b, impl="pallas")
  with pytest.raises(ValueError, match="do not chain"):
    kernels.lora_matmul(x, w, b.T, b, impl="xla")
  with pytest.raises(ValueError, match="lora_impl"):
    ModelConfig("llama", 8, 8, 8, 1, 1, 1, 8, lora_impl="fused")


def test_one_set_of_implementation_names():
  """The kernel and the model take the same names; an old or unknown one is one line."""
  x, w, a, b = matmul_inputs(0, 8, 16, 24, 4)
  for impl in kernels.IMPLS:  # every name both accept (pallas needs a TPU or GPU to run)
    ModelConfig("llama", 8, 8, 8, 1, 1, 1, 8, lora_impl=impl)
    if impl != "pallas":
      np.testing.assert_allclose(kernels.lora_matmul(x, w, a, b, 0.5, impl=impl),
                                 matmul_lib.lora_dense(x, w, a, b, 0.5), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="lora_impl 'reference': expected one of auto, xla"):
    kernels.lora_matmul(x, w, a, b, impl="reference")
  with pytest.raises(ValueError, match="lora_impl 'reference'"):
    kernels.selects_pallas("reference")
  with pytest.raises(ValueError, match="lora_impl 'reference'"):
    ModelConfig("llama", 8, 8, 8, 1, 1, 1, 8, lora_impl="reference")
  # "xla" in the kernel is its reference VJP: the model's autodiffed XLA path, same numbers
  np.testing.assert_allclose(kernels.lora_matmul(x, w, a, b, 0.5, impl="xla"),
                             matmul_lib.lora_dense(x, w, a, b, 0.5), rtol=1e-6, atol=1e-6)


def test_auto_is_not_pallas_until_measured_faster():
  # CPU, where no Pallas kernel was ever measured (nor compiles): auto is XLA
  assert jax.default_backend() == "cpu" and not kernels.selects_pallas("auto")
  assert kernels.selects_pallas("interpret") and not kernels.selects_pallas("xla")


def _three_steps(impl: str) -> list[float]:
  cfg = CFG.replace(lora_impl=impl, remat=True)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)))["params"]
  spec = models.lora_spec(cfg, rank=4)
  adapters = randomize_b(jlora.init_adapters(params, spec, jax.random.PRNGKey(1)),
                         jax.random.PRNGKey(2))
  trainable, frozen = optim.trainable(params, adapters, spec)
  tx = optim.optimizer(1e-2)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(), jax.devices()[:1])
  step, state = train_step.build(lm.lm_loss(model, spec, loss_chunk=16), tx, trainable, frozen,
                                 mesh)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 13))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": np.ones((8, 12), np.float32)}
  losses = []
  for _ in range(3):  # one batch, memorised: the loss must fall
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  return losses


@pytest.mark.slow
def test_model_training_steps_interpret_equal_xla():
  xla, interpret = _three_steps("xla"), _three_steps("interpret")
  np.testing.assert_allclose(interpret, xla, rtol=1e-5)
  assert xla[2] < xla[0]
