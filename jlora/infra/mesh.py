"""The device mesh and the batches on it: the ("data", "fsdp", "tensor") mesh, batch
arrays split over data x fsdp, and the mesh context a traced program carries so code that
XLA cannot partition itself (Pallas kernels) runs per batch shard (``over_batch_shards``).
Nothing here knows parameters or adapters: their shardings are decided in
``jlora.core.sharding``. One ``jax.jit`` program runs the same on one device, many local
devices, or many processes (``jax.distributed``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Logical axis (as the models name them) -> mesh axis. Unlisted logical axes replicate.
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1 for "all remaining devices".

  Attributes:
    data: data-parallel replicas.
    fsdp: shards of the frozen base (and of the batch).
    tensor: tensor-parallel shards of heads / MLP / vocabulary.
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, n_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh sizes {sizes} must be positive (or -1 for the rest)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if n_devices % known:
        raise ValueError(f"mesh sizes {sizes} do not divide the {n_devices} devices")
      sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
      raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                       f"{math.prod(sizes)} devices, but {n_devices} are available")
    return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all, every process)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = config.shape(len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drop mesh axes of size 1 and axes that do not divide the dimension they shard
  (that dimension is replicated instead)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
                  if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in names)
    keep = names and dim % size == 0
    out.append((names[0] if len(names) == 1 else names) if keep else None)
  return P(*out)


def shardings_of(tree: Any) -> Any:
  """The sharding of every array in ``tree``."""
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def traced_in(fn, mesh) -> Any:
  """``fn`` traced with ``mesh`` as the context mesh (``jax.sharding.use_abstract_mesh``), so
  code inside it that XLA cannot partition by itself finds the mesh (``over_batch_shards``)."""
  abstract = mesh.abstract_mesh

  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(abstract):
      return fn(*args, **kwargs)
  return wrapped


def over_batch_shards(fn, n_args: int, rows: int) -> Any:
  """``fn(rows_arg, *whole_args)`` run per batch shard of the context mesh (``shard_map``):
  its first argument and its result split on their leading axis of ``rows`` over data x
  fsdp, the other arguments gathered whole on every device (as FSDP gathers a layer's
  weights; a tensor-parallel axis is gathered too). For computations XLA cannot partition
  itself: Mosaic (TPU) and Triton (GPU) kernels. ``fn`` unchanged outside a mesh context
  (``traced_in``) or on one device; rows that do not split evenly run whole everywhere."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn
  axes = tuple(a for a in BATCH if a in mesh.axis_names and mesh.shape[a] > 1)
  shards = math.prod(mesh.shape[a] for a in axes)
  row_spec = P(axes) if axes and rows % shards == 0 else P()
  # check_vma=False: Pallas calls carry no varying-axes annotations; the cotangents of the
  # whole (unmapped) arguments are summed over the shards by shard_map's transpose.
  return jax.shard_map(fn, mesh=mesh, in_specs=(row_spec,) + (P(),) * (n_args - 1),
                       out_specs=row_spec, check_vma=False)


def single_device_mesh() -> Mesh:
  """A 1x1x1 mesh over the first device (scripts, notebooks, benchmarks)."""
  return make_mesh(MeshConfig(), jax.devices()[:1])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays: leading axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each host's slice of the batch into global arrays
  (``jax.make_array_from_process_local_data``); the global batch must divide data x fsdp."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  out = {}
  for name, x in local.items():
    x = np.asarray(x)
    global_rows = x.shape[0] * jax.process_count()
    if global_rows % shards:
      raise ValueError(f"batch of {global_rows} rows ('{name}') is not divisible by the "
                       f"{shards} data x fsdp shards of the mesh")
    out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return out
