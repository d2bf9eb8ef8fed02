"""jlora.interop.peft_moe: PEFT's adapters on fused MoE expert tensors (target_parameters),
both ways, with PEFT's logits."""

import jax
import numpy as np
import pytest

from jlora import models
from jlora.core import lora
from jlora.interop import peft as jpeft
from tests.helpers import hf_model, jlora_logits, randomize_b, tiny_model_dir, torch_logits

torch = pytest.importorskip("torch")


peft = pytest.importorskip("peft")


def test_peft_moe_adapter_on_fused_expert_tensors_gives_peft_logits(tmp_path):
  """PEFT's own target_parameters LoRA on transformers' fused Qwen3-MoE experts
  (gate_up_proj [E, 2I, H], down_proj [E, H, I]), with attention targets beside it."""
  model_dir = tiny_model_dir(str(tmp_path / "base"), "qwen3_moe")
  torch.manual_seed(0)
  model = peft.get_peft_model(hf_model(model_dir), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
      init_lora_weights=False))  # random B too: a zero B would hide a wrong layout
  model.save_pretrained(str(tmp_path / "adapter"))
  want = torch_logits(model)
  _, params, cfg = models.load(model_dir)
  adapters, spec, params = jpeft.load_peft(str(tmp_path / "adapter"), params, cfg)
  assert adapters["layers"]["moe"]["up_proj"]["kernel"]["a"].shape[:2] == (cfg.num_layers, 4)
  np.testing.assert_allclose(jlora_logits(model_dir, params, adapters, spec), want,
                             atol=1e-4, rtol=0)
  assert np.abs(jlora_logits(model_dir) - want).max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("targets", ["all", "mlp"])
def test_fused_moe_export_loads_in_peft_with_jloras_logits(tmp_path, targets):
  """jlora's per-expert adapters (rank 4 // 2 active experts = 2 per expert, attention
  rank 4 with "all") written in PEFT's fused target_parameters layout."""
  model_dir = tiny_model_dir(str(tmp_path / "base"), "qwen3_moe")
  _, params, cfg = models.load(model_dir)
  spec = models.lora_spec(cfg, 4, targets=targets)
  adapters = randomize_b(lora.init_adapters(params, spec, jax.random.PRNGKey(0)),
                         jax.random.PRNGKey(1))
  want = jlora_logits(model_dir, params, adapters, spec)
  out = jpeft.save_peft(str(tmp_path / "fused"), adapters, spec, cfg, moe_layout="fused")
  saved = jpeft.read_config(out)
  assert saved["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
  model = peft.PeftModel.from_pretrained(hf_model(model_dir), out).eval()
  np.testing.assert_allclose(torch_logits(model), want, atol=1e-4, rtol=0)
  back, spec2, _ = jpeft.load_peft(out, params, cfg)  # and jlora reads it back
  np.testing.assert_allclose(jlora_logits(model_dir, params, back, spec2), want, atol=1e-4)
