"""What a run optimises: the LM loss pieces (``lm``), supervised fine-tuning (``sft``),
policy-gradient RL (``rl``) and preference tuning (``dpo``). Each registers a
``driver.Kind`` when imported (its ``jlora`` command, config section, rules); importing
this package registers them all, and the ``jlora`` package imports it, so every config
reader knows their sections."""

from jlora.objectives import sft, rl, dpo  # noqa: F401,I001  (registration, in the CLI's order)
