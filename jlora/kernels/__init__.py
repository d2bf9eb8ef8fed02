"""The fused LoRA matmul: Pallas kernels for TPU and GPU behind one custom VJP
(``pallas``), their XLA reference term (``reference``), and which of them runs
(``dispatch``)."""

from jlora.kernels.dispatch import (FASTER_ON, IMPLS, TARGETS, lowering_for, platform,
                                    selects_pallas)
from jlora.kernels.pallas import lora_matmul

__all__ = ["FASTER_ON", "IMPLS", "TARGETS", "lora_matmul", "lowering_for", "platform",
           "selects_pallas"]
