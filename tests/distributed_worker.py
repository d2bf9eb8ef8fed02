"""One process of the two-process test: 2 CPU devices, gloo, the test_sharding run."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_default_matmul_precision", "highest")

from jlora.infra import mesh as mesh_lib  # noqa: E402
from jlora.infra import multihost


def main(process_id: int, port: int, out: str, steps: int) -> None:
  multihost.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=60)
  import numpy as np

  from tests.helpers import sharded_setup, tiny_batch
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=-1))  # 4 devices over 2 processes
  step, state, frozen = sharded_setup(mesh)
  local = {k: v[4 * process_id: 4 * process_id + 4] for k, v in tiny_batch(0).items()}
  losses = []
  for _ in range(steps):
    state, metrics = step(state, frozen, mesh_lib.global_batch(local, mesh))
    losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
  with open(out, "w") as f:
    json.dump({"losses": losses, "devices": jax.device_count(),
               "local_devices": jax.local_device_count()}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
