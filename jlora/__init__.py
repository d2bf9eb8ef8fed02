"""jlora: a functional LoRA stack for JAX/Flax.

The transform (``jlora.core.lora``) rewrites nothing in place: adapters are a separate
pytree that mirrors the targeted kernels, applied by the LoRA matmul (``jlora.core.matmul``,
jlora's own models) or around third-party Flax layers (``jlora.apply`` / ``jlora.apply_nnx``).

The package is built in layers, each importing only the ones before it (a test holds it
to that; docs/ARCHITECTURE.md draws them): ``infra`` (files, meshes, processes),
``kernels`` (Pallas), ``core`` (the LoRA transform and its math), ``models``, ``data``,
``interop`` (PEFT, merged checkpoints), ``findings`` (the LR rule, the advisor), ``run``
(config, build, step, loop, checkpoints, run directories), ``objectives`` (SFT, RL),
``study``; at the top the ``jlora`` command (``cli``), ``demo`` and ``notebook``.
"""

from jlora.core.flax_apply import apply, apply_nnx, linen_layouts, nnx_layouts
from jlora.core.lora import LoraSpec, Rule, count_params, describe, init_adapters, merge, unmerge

from jlora import objectives  # noqa: E402,F401  (registers the objectives; after the above)

__version__ = "0.1.0"

__all__ = ["LoraSpec", "Rule", "apply", "apply_nnx", "count_params", "describe",
           "init_adapters", "linen_layouts", "merge", "nnx_layouts", "unmerge"]
