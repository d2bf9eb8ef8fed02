"""Other tools' formats: PEFT adapters (in and out, MoE layouts included) and merged
Hugging Face model directories."""
