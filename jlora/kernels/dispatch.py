"""Which LoRA matmul runs, decided in one place, with one set of names (``IMPLS``):

- "xla": XLA matmuls. In jlora's layers (``model.lora_impl``, ``jlora.core.matmul``) they
  are differentiated by JAX; ``lora_matmul(impl="xla")`` runs the kernels' reference
  through their custom VJP.
- "pallas": the fused kernels compiled for this backend (TPU: Mosaic, GPU: Triton);
  refused up front on a backend without a kernel layout.
- "interpret": the kernels on CPU through Pallas's interpreter (tests).
- "auto": "pallas" on the backends where ``bench/kernel.py`` measured the fused kernel
  faster (``FASTER_ON``), else "xla".

``lowering_for`` traces for another platform than this host's (ahead-of-time export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any

import jax

IMPLS = ("auto", "xla", "pallas", "interpret")
TARGETS = ("tpu", "gpu")  # kernel layouts
# Backends where bench/kernel.py showed the fused kernel faster than the XLA reference
# (fwd+bwd, bf16, the shapes in that benchmark). Empty until a run on that hardware says so.
FASTER_ON: frozenset[str] = frozenset()
_PLATFORMS = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu"}
_target_platform = threading.local()


def platform() -> str:
  """The platform jlora traces for: this process's backend, or the one ``lowering_for`` set."""
  return getattr(_target_platform, "name", None) or jax.default_backend()


@contextlib.contextmanager
def lowering_for(name: str):
  """Trace for platform ``name`` ("tpu", "gpu"/"cuda", "cpu") whatever this host runs on.

  For ``jax.export.export(..., platforms=[name])`` ahead of time, e.g. a TPU program built
  and checked on a CPU host: the Pallas kernel layout ("pallas", "auto") and the attention
  implementation follow ``name`` instead of ``jax.default_backend()``.
  """
  if name not in _PLATFORMS:
    raise ValueError(f"lowering_for({name!r}): expected one of {', '.join(_PLATFORMS)}")
  before = getattr(_target_platform, "name", None)
  _target_platform.name = _PLATFORMS[name]
  try:
    yield
  finally:
    _target_platform.name = before


@dataclasses.dataclass(frozen=True)
class Kernel:
  """How the fused path runs: which kernel layout (None: XLA), and whether interpreted."""
  target: str | None
  interpret: Any = False  # False, True, or a pltpu.InterpretParams


def _check(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"lora_impl {impl!r}: expected one of {', '.join(IMPLS)}")


def choose(impl: str, target: str | None = None, interpret_params=None) -> Kernel:
  """The ``Kernel`` that ``impl`` runs on this (or ``lowering_for``'s) platform; ``target``
  forces a layout for "pallas" / "interpret" ("tpu" by default for "interpret")."""
  _check(impl)
  if target is not None and target not in TARGETS:
    raise ValueError(f"lora_matmul target={target!r}: expected one of {', '.join(TARGETS)}")
  backend = platform()
  if impl == "auto":
    impl = "pallas" if backend in FASTER_ON else "xla"
  if impl == "xla":
    return Kernel(None)
  if impl == "interpret":
    return Kernel(target or "tpu", interpret_params or True)
  native = {"tpu": "tpu", "gpu": "gpu"}.get(_PLATFORMS.get(backend, backend))
  if native is None:
    raise ValueError(f"lora_impl 'pallas' needs a TPU or GPU (backend is {backend!r}); use "
                     "'interpret' to run the kernels on CPU, or 'xla'")
  return Kernel(target or native)


def selects_pallas(impl: str) -> bool:
  """Whether ``impl`` (``model.lora_impl``) runs the Pallas kernels, compiled or
  interpreted, on this backend; a one-line ValueError for an unknown name or "pallas"
  where no kernel layout exists."""
  return choose(impl).target is not None
