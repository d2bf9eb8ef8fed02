"""jlora.infra.mesh: a mesh that does not fit the devices and a batch that does not split over
the mesh are one-line errors."""

import pytest

from jlora.infra import mesh as mesh_lib
from tests.helpers import tiny_batch


def test_bad_mesh_and_batch():
  with pytest.raises(ValueError, match="3 devices, but 8 are available"):
    mesh_lib.make_mesh(mesh_lib.MeshConfig(3, 1, 1))
  with pytest.raises(ValueError, match="do not divide the 8 devices"):
    mesh_lib.make_mesh(mesh_lib.MeshConfig(-1, 3, 1))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    mesh_lib.make_mesh(mesh_lib.MeshConfig(-1, -1, 1))
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(8, 1, 1))
  with pytest.raises(ValueError, match="batch of 6 rows .* not divisible by the 8"):
    mesh_lib.global_batch(tiny_batch(0, rows=6), mesh)
