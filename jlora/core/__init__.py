"""The LoRA transform: specs and plans, adapters, the LoRA matmul, Flax interception,
quantised bases, what trains and its optimizer, where parameters live. Pure functions over
pytrees; imports only ``jlora.infra`` and ``jlora.kernels``."""
