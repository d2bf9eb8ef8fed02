"""Other tools' formats: PEFT adapters (in and out, MoE layouts included), llama.cpp LoRA
adapters (GGUF), and merged Hugging Face model directories."""
