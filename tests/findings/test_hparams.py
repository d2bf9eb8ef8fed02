"""jlora.findings.hparams: the LR rule and LoRA parameter counts against docs/FINDINGS.md
(findings 1, 2 and 8)."""

import pytest

from jlora.findings import hparams
from jlora.models import ModelConfig
from tests.helpers import LLAMA_8B

LLAMA_1B = ModelConfig("llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                       num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                       tie_embeddings=True)


QWEN3_8B = ModelConfig("qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, qk_norm=True)


@pytest.mark.parametrize("cfg, expected", [(LLAMA_8B, 2.9e-4), (LLAMA_1B, 4.9e-4),
                                           (QWEN3_8B, 4.7e-4)])
def test_lora_lr_matches_the_published_fit(cfg, expected):
  assert hparams.lora_lr(cfg) == pytest.approx(expected, rel=0.05)  # FINDINGS 2's values
  assert hparams.lora_lr(cfg) == pytest.approx(10 * hparams.full_ft_lr(cfg))
  assert hparams.lora_lr(cfg, steps=50) == pytest.approx(15 * hparams.full_ft_lr(cfg))


def test_no_fit_for_other_families_is_said(monkeypatch):
  mistral = LLAMA_1B.replace(model_type="mistral")
  assert hparams.full_ft_lr(mistral) == hparams.full_ft_lr(LLAMA_1B)  # the llama family fit
  monkeypatch.delitem(hparams.POWER, "llama")
  with pytest.raises(ValueError, match="no learning-rate fit exists for the 'mistral'"):
    hparams.full_ft_lr(mistral)
  with pytest.raises(ValueError, match="must be > 0"):
    hparams.lora_lr_from_full_ft(0.0)
  assert hparams.lora_lr_from_full_ft(2e-5) == pytest.approx(2e-4)


@pytest.mark.parametrize("rank, targets, billions", [
    (256, ["all", "lm_head"], 0.705), (256, ["mlp", "lm_head"], 0.487),
    (256, ["attn", "lm_head"], 0.252), (128, ["mlp", "lm_head"], 0.243),
    (256, "all", 0.671), (256, "mlp", 0.453), (256, "attn", 0.218), (128, "mlp", 0.226),
])
def test_llama_8b_lora_params_from_config_alone(rank, targets, billions):
  count = hparams.lora_params(LLAMA_8B, rank, targets)
  assert count / 1e9 == pytest.approx(billions, rel=0.02)
  # r x (in + out) per adapted kernel: q and o 4096 -> 4096, k and v 4096 -> 1024, gate and
  # up 4096 -> 14336, down 14336 -> 4096, lm_head 4096 -> 128256; 32 layers.
  attn, mlp = 2 * (4096 + 4096) + 2 * (4096 + 1024), 3 * (4096 + 14336)
  names = [targets] if isinstance(targets, str) else targets
  per_layer = {"all": attn + mlp, "attn": attn, "mlp": mlp}[names[0]]
  head = 4096 + 128256 if "lm_head" in names else 0
  assert count == rank * (32 * per_layer + head)


def test_moe_rank_per_expert():
  moe = ModelConfig("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                    num_experts=4, experts_per_token=2, moe_intermediate_size=16)
  # 2 layers x 4 experts x 3 projections, rank 8 // 2 active = 4: gate/up 4*(32+16), down 4*(16+32)
  assert hparams.lora_params(moe, 8, r"experts|moe/(gate|up|down)_proj") == 2 * 4 * 3 * 4 * 48
