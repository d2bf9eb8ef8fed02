"""jlora.interop.peft_moe: PEFT's adapters on fused MoE expert tensors (target_parameters),
both ways, with PEFT's logits."""

import json

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


@pytest.mark.parametrize("spelling", [
    dict(target_parameters=["gate_up_proj", "down_proj"]),  # suffixes, as PEFT matches them
    dict(target_parameters=["model.layers.1.mlp.experts.gate_up_proj",  # one layer each
                            "model.layers.0.mlp.experts.down_proj"]),
    dict(target_parameters=["mlp.experts.gate_up_proj", "experts.down_proj"],
         rank_pattern={"gate_up_proj": 2, "model.layers.1.mlp.experts.down_proj": 6},
         alpha_pattern={"gate_up_proj": 3.0, "q_proj": 5.0}),
    dict(target_parameters=["gate_up_proj", "down_proj"], layers_to_transform=[1],
         alpha_pattern={"down_proj": 12.0}),
], ids=["suffix", "per-layer", "patterns", "layers_to_transform"])
def test_peft_moe_adapters_in_every_spelling_give_peft_logits(tmp_path, spelling):
  """PEFT's target_parameters as users write them (PEFT matches a parameter whose name
  ends with an entry), with rank/alpha patterns keyed on the fused tensors' names (per
  layer too) and layers_to_transform, attention targets beside: PEFT's logits in jlora,
  and jlora's fused export of it loads in PEFT with the same logits."""
  model_dir = tiny_model_dir(str(tmp_path / "base"), "qwen3_moe")
  torch.manual_seed(0)
  model = peft.get_peft_model(hf_model(model_dir), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
      **spelling))
  model.save_pretrained(str(tmp_path / "adapter"))
  want = torch_logits(model)
  _, params, cfg = models.load(model_dir)
  adapters, spec, params = jpeft.load_peft(str(tmp_path / "adapter"), params, cfg)
  np.testing.assert_allclose(jlora_logits(model_dir, params, adapters, spec), want,
                             atol=1e-4, rtol=0)
  out = jpeft.save_peft(str(tmp_path / "fused"), adapters, spec, cfg, moe_layout="fused")
  again = peft.PeftModel.from_pretrained(hf_model(model_dir), out).eval()
  np.testing.assert_allclose(torch_logits(again), want, atol=1e-4, rtol=0)


def test_target_parameters_that_match_nothing_are_one_line(tmp_path, capsys):
  model_dir = tiny_model_dir(str(tmp_path / "base"), "qwen3_moe")
  model = peft.get_peft_model(hf_model(model_dir), peft.LoraConfig(
      r=2, target_parameters=["gate_up_proj"], init_lora_weights=False))
  model.save_pretrained(str(tmp_path / "adapter"))
  config_file = tmp_path / "adapter" / "adapter_config.json"
  config = json.loads(config_file.read_text())
  config_file.write_text(json.dumps({**config, "target_parameters": ["experts.gate_proj"]}))
  from jlora import cli
  capsys.readouterr()  # transformers' progress bars
  assert cli.main(["import-peft", str(tmp_path / "adapter"), "--model", model_dir]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "target_parameters entry 'experts.gate_proj' matches none" \
      in err, err
