"""The findings of "LoRA Without Regret" as rules: the LR rule (``hparams``) and the
advisor's checks (``advisor``)."""
