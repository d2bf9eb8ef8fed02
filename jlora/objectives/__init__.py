"""What a run optimises: the LM loss pieces (``lm``), supervised fine-tuning (``sft``)
and policy-gradient RL (``rl``). Each registers a ``driver.Kind`` when imported (its
``jlora`` command, config section, rules); importing this package registers them all, and
the ``jlora`` package imports it, so every config reader knows their sections."""

from jlora.objectives import sft, rl  # noqa: F401,I001  (registration, in the CLI's order)
