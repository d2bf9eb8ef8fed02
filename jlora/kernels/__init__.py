"""Pallas kernels: the fused LoRA matmul (custom VJP), its XLA reference, backend dispatch."""

from jlora.kernels.pallas import FASTER_ON, IMPLS, KERNEL_IMPLS, TARGETS, lora_matmul, lowering_for
from jlora.kernels.pallas import platform, selects_pallas

__all__ = ["FASTER_ON", "IMPLS", "KERNEL_IMPLS", "TARGETS", "lora_matmul", "lowering_for",
           "platform", "selects_pallas"]
