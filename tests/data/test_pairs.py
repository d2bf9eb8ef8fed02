"""jlora.data.pairs: preference pairs rendered as SFT renders (real SmolLM2 template), the
mask on each completion only, prompts cut from the left to fit and completions never,
the row layout every micro-batch split keeps paired, processes' rows and resume."""

import numpy as np
import pytest

from jlora import data, models
from jlora.data import pairs, render, tasks
from tests.helpers import byte_tokenizer

PAIR = {"prompt": "What is 7 plus 5?", "chosen": "12", "rejected": "13"}


def _cfg(**kw):
  return data.DataConfig(**{"source": "task:arithmetic_pairs", "size": 24, "seq_len": 48,
                            "batch_size": 4, "prefetch": 0, **kw})


def test_pairs_render_as_sft_with_the_mask_on_each_completion_only():
  tok = data.Tokenizer.from_model(models.smollm2_gguf())
  (c_ids, c_mask), (r_ids, r_mask) = render.encode_pair(PAIR, tok)
  assert tok.decode(c_ids[c_mask == 1]) == "12<|im_end|>\n"
  assert tok.decode(r_ids[r_mask == 1]) == "13<|im_end|>\n"
  # the chosen row is exactly SFT's rendering of the prompt and that completion
  sft_ids, sft_mask = data.encode({"prompt": PAIR["prompt"], "completion": "12"}, tok)
  np.testing.assert_array_equal(c_ids, sft_ids)
  np.testing.assert_array_equal(c_mask, sft_mask)
  # TRL's conversational format: a prompt with an assistant turn of its own, which is
  # context, not scored
  chat = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                     {"role": "user", "content": "7 plus 5?"}],
          "chosen": [{"role": "assistant", "content": "12"}],
          "rejected": [{"role": "assistant", "content": "13"}]}
  (ids, mask), _ = render.encode_pair(chat, tok)
  assert tok.decode(ids[mask == 1]) == "12<|im_end|>\n"
  assert "Yo<|im_end|>" in tok.decode(ids[mask == 0])
  with pytest.raises(ValueError, match="record has no field 'rejected'"):
    render.encode_pair({"prompt": "a", "chosen": "b"}, tok)


def test_a_long_prompt_is_cut_from_the_left_and_a_long_completion_refused():
  tok = byte_tokenizer()
  cfg = _cfg(seq_len=24)
  record = {"prompt": "x" * 40, "chosen": "yes", "rejected": "no!"}
  chosen, rejected = pairs.encode(record, tok, cfg)
  for row, text in ((chosen, "yes"), (rejected, "no!")):
    assert row["cut"] > 0 and row["inputs"].shape == (24,)
    kept = row["targets"][row["mask"] == 1]
    assert tok.decode(kept).startswith(text)  # the whole completion is scored
  full_ids, full_mask = render.encode_pair(record, tok)[0]
  np.testing.assert_array_equal(chosen["targets"][:chosen["length"]], full_ids[-24:])
  with pytest.raises(ValueError, match=r"^record 3 \(rejected\): 42 completion tokens do not "
                                       r"fit data.seq_len=24"):
    pairs.encode({**record, "rejected": "z" * 40}, tok, cfg, "record 3")


@pytest.mark.parametrize("blocks,k,contiguous", [(1, 1, False), (1, 2, False), (2, 2, True)])
def test_every_micro_batch_holds_its_pairs_chosen_then_rejected(blocks, k, contiguous):
  """make_step's micro-batches (row i -> i % k) at blocks=1, a group's contiguous ones
  at blocks=k: in each, row j of the first half and row j of the second are one pair."""
  tok = data.Tokenizer.from_model(models.smollm2_gguf())
  batch = next(iter(pairs.dataset(_cfg(), tok, blocks=blocks)))
  rows = len(batch["inputs"])
  micro = [np.arange(m * rows // k, (m + 1) * rows // k) if contiguous else
           np.arange(m, rows, k) for m in range(k)]
  source = tasks.source("arithmetic_pairs", size=24)
  answers = {r["prompt"]: (r["chosen"], r["rejected"]) for r in source}
  for idx in micro:
    half = len(idx) // 2
    for c, r in zip(idx[:half], idx[half:]):
      text_c, text_r = (tok.decode(batch["targets"][i][batch["mask"][i] == 1]) for i in (c, r))
      prompt = tok.decode(batch["inputs"][c][batch["mask"][c] == 0]).split("user\n")[-1]
      prompt = prompt.split("<|im_end|>")[0]
      assert (text_c, text_r) == tuple(a + "<|im_end|>\n" for a in answers[prompt])


def test_processes_rows_make_the_global_batch_and_resume_is_exact():
  tok = byte_tokenizer()
  cfg = _cfg()
  whole = iter(pairs.dataset(cfg, tok, process_index=0, process_count=1))
  parts = [iter(pairs.dataset(cfg, tok, process_index=p, process_count=2)) for p in range(2)]
  for _ in range(7):  # past an epoch (24 pairs / 4)
    want = next(whole)
    got = [next(p) for p in parts]
    for key in pairs.FIELDS:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
  state = whole.get_state()
  expected = [next(whole) for _ in range(3)]
  again = iter(pairs.dataset(cfg, tok, process_index=0, process_count=1))
  again.set_state(state)
  for want in expected:
    got = next(again)
    assert all((got[k] == want[k]).all() for k in pairs.FIELDS)


def test_a_short_last_held_out_batch_is_completed_with_pairs_of_weight_0():
  tok = byte_tokenizer()
  batches = list(pairs.dataset(_cfg(size=6, shuffle=False, epochs=1), tok,
                               drop_remainder=False))
  assert len(batches) == 2
  last = batches[1]["mask"].sum(axis=1)
  assert (last[[0, 1, 4, 5]] > 0).all() and (last[[2, 3, 6, 7]] == 0).all()
