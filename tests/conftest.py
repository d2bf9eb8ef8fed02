import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Eight fake CPU devices for the sharding tests (single-device tests use device 0).
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def rng():
  return jax.random.PRNGKey(0)
