"""jlora: a functional LoRA stack for JAX/Flax.

The transform (``jlora.lora``) rewrites nothing in place: adapters are a separate pytree
that mirrors the targeted kernels, applied by ``jlora.ops`` matmuls (jlora's own models) or
around third-party Flax layers (``jlora.apply`` / ``jlora.apply_nnx``).
"""

from jlora.flax_apply import apply, apply_nnx, linen_layouts, nnx_layouts
from jlora.lora import (LoraSpec, Rule, count_params, describe, init_adapters, merge,
                        unmerge)

__version__ = "0.1.0"

__all__ = ["LoraSpec", "Rule", "apply", "apply_nnx", "count_params", "describe",
           "init_adapters", "linen_layouts", "merge", "nnx_layouts", "unmerge"]
