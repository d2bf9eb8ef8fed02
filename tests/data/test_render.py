"""jlora.data.render: chat rendering and loss masks with the real SmolLM2 template; a template
that is not prefix-stable is refused."""

import pytest

from jlora import data
from tests.helpers import byte_tokenizer


def test_chat_mask_with_the_real_smollm2_template():
  from jlora import models
  tok = data.Tokenizer.from_model(models.smollm2_gguf())
  assert tok.chat_template and tok.tok.id_to_token(tok.eos_id) == "<|im_end|>"
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is 7 plus 5?"},
              {"role": "assistant", "content": "12"},
              {"role": "user", "content": "And 3 plus 4?"},
              {"role": "assistant", "content": "It is 7."}]
  ids, mask = data.encode_chat(tok, messages)
  text = data.render_chat(tok, messages)
  assert tok.decode(ids) == text  # masks index the ids of the whole rendered string
  assert tok.decode(ids[mask == 1]) == "12<|im_end|>\nIt is 7.<|im_end|>\n"
  # Everything else, system and user turns and the assistant headers, carries mask 0.
  assert "What is 7 plus 5?" in tok.decode(ids[mask == 0])
  assert tok.decode(ids[mask == 0]).count("<|im_start|>assistant\n") == 2
  # A prompt/completion record rendered as chat masks exactly the completion turn.
  ids, mask = data.encode({"prompt": "What is 7 plus 5?", "completion": "12"}, tok)
  assert tok.decode(ids[mask == 1]) == "12<|im_end|>\n"
  assert tok.decode(data.prompt_ids({"prompt": "What is 7 plus 5?"}, tok)).endswith(
      "<|im_start|>assistant\n")


def test_chat_template_that_is_not_prefix_stable_is_refused():
  bad = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ messages|length }}"
  with pytest.raises(ValueError, match="prefix by prefix"):
    data.encode_chat(byte_tokenizer(bad), [{"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"}])
