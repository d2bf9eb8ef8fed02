"""jlora.run.evaluate: greedy answers of several adapters stacked over one base, in one
decode, are each adapter's own (against a solo decode per adapter)."""

import jax

from jlora import data, models
from jlora.core import lora, stack
from jlora.run import evaluate
from tests.helpers import randomize_b


def test_group_answers_are_each_adapters_own_answers(model_dir):
  model, params, cfg = models.load(model_dir)
  tok = data.Tokenizer.from_model(model_dir)
  specs = [models.lora_spec(cfg, rank=2), models.lora_spec(cfg, rank=4, targets="attn"),
           models.lora_spec(cfg, rank=1, targets="mlp"), models.lora_spec(cfg, rank=2)]
  st = stack.stack(params, specs)
  solos = [randomize_b(lora.init_adapters(params, p, jax.random.PRNGKey(i)),
                       jax.random.PRNGKey(10 + i), 2.0) for i, p in enumerate(st.plans)]
  dcfg = data.DataConfig(source="task:arithmetic", size=50, split="test")
  source = data.open_source(dcfg)
  records = [source[i] for i in range(7)]
  # adapter 2 is not asked (no rows); the others differ in prompts and lengths
  runs = [(dcfg, records[:3], 5), (dcfg, records[3:4], 3), None, (dcfg, records[4:], 4)]
  stacked = stack.with_adapters(params, stack.stack_adapters(solos, st), st)
  got = evaluate.group_answers(model, stacked, tok, runs)
  want = [evaluate.answers(model, lora.with_adapters(params, solos[i], st.plans[i]), tok,
                           *run) if run else [] for i, run in enumerate(runs)]
  assert got == want
  # in decodes of at most 3 prompts (runs 0 and 3 alone, run 1 with none after it)
  assert evaluate.group_answers(model, stacked, tok, runs, max_rows=3) == want
  assert [len(x) for x in got] == [3, 1, 0, 3]
  other = evaluate.answers(model, lora.with_adapters(params, solos[1], st.plans[1]), tok,
                           dcfg, records[:3], 5)
  assert other != want[0]  # the adapters answer differently: the rows are told apart
