"""What a run optimises: the LM loss pieces (``lm``), supervised fine-tuning (``sft``)
and policy-gradient RL (``rl``), each declared to the run as a ``driver.Kind``."""
