"""jlora.interop.peft: jlora -> PEFT adapters checked by PEFT and transformers themselves
(logits), PEFT adapters -> jlora with per-module ranks, MoE per-expert names, and bad
adapters failing clearly without writing anything."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import cli, models
from jlora.core import lora, optim
from jlora.interop import merged
from jlora.interop import peft as jpeft
from jlora.objectives import sft
from jlora.run import build, config
from jlora.run import trained as trained_lib
from tests.helpers import hf_model, jlora_logits, randomize_b, tiny_model_dir, torch_logits

torch = pytest.importorskip("torch")


peft = pytest.importorskip("peft")


def train_tiny(model_dir, run_dir, **lora_section):
  cfg = config.from_dict({
      "run_dir": str(run_dir), "model": {"path": model_dir},
      "lora": {"rank": 4, **lora_section},
      "train": {"steps": 5, "checkpoint_every": 5, "lr": 1e-2},
      "data": {"source": "task:arithmetic", "size": 64, "seq_len": 48, "batch_size": 8},
      "eval": {"batches": 0, "examples": 0}})
  sft.run(cfg, progress=False, log=lambda _: None)
  return str(run_dir)


@pytest.mark.parametrize("kind,lora_section", [
    ("llama", {}),
    ("qwen3", {"targets": [".*attn/(q|v)_proj", "mlp"], "full": ["lm_head"]})])
def test_trained_run_round_trips_through_peft(tmp_path, kind, lora_section):
  model_dir = tiny_model_dir(str(tmp_path / "base"), kind)
  run = train_tiny(model_dir, tmp_path / "run", **lora_section)
  run_ = trained_lib.load_trained(run)
  s, trained = run_.setup, run_.trainable
  assert float(jnp.abs(trained["lora"]["layers"]["mlp"]["up_proj"]["kernel"]["b"]).max()) > 0
  ours = jlora_logits(model_dir, optim.combine(trained["full"], s.frozen), trained["lora"],
                      s.spec)

  out = tmp_path / "peft"
  assert cli.main(["export", run, "--format", "peft", "--out", str(out)]) == 0
  adapter_config = json.loads((out / "adapter_config.json").read_text())
  assert adapter_config["base_model_name_or_path"] == os.path.abspath(model_dir)
  if lora_section:
    assert adapter_config["modules_to_save"] == ["lm_head"]
    assert adapter_config["target_modules"] == ["down_proj", "gate_proj", "q_proj",
                                                "up_proj", "v_proj"]
  peft_model = peft.PeftModel.from_pretrained(hf_model(model_dir), str(out)).eval()
  np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-4, rtol=0)

  merged_dir = tmp_path / "merged"
  assert cli.main(["merge", run, "--out", str(merged_dir), "--max-shard-size", "20KB"]) == 0
  assert (merged_dir / "model.safetensors.index.json").is_file()  # sharded
  assert (merged_dir / "tokenizer.json").is_file()
  merged = torch_logits(hf_model(str(merged_dir)))
  np.testing.assert_allclose(merged, torch_logits(peft_model.merge_and_unload()), atol=1e-4,
                             rtol=0)
  np.testing.assert_allclose(merged, ours, atol=1e-4, rtol=0)
  # jlora reads its own merged checkpoint back: the same model without adapters.
  np.testing.assert_allclose(jlora_logits(str(merged_dir)), ours, atol=1e-4, rtol=0)


def test_peft_adapter_imports_with_per_module_ranks(tmp_path):
  model_dir = tiny_model_dir(str(tmp_path / "base"))
  torch.manual_seed(0)
  base = hf_model(model_dir)
  cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True,
                        rank_pattern={"q_proj": 8, "model.layers.1.mlp.up_proj": 2},
                        alpha_pattern={"down_proj": 5}, init_lora_weights=False)
  peft_model = peft.get_peft_model(base, cfg).eval()  # init_lora_weights=False: B != 0
  peft_model.save_pretrained(str(tmp_path / "adapter"))
  want = torch_logits(peft_model)

  _, params, model_cfg = models.load(model_dir)
  adapters, spec, params = jpeft.load_peft(str(tmp_path / "adapter"), params, model_cfg)
  assert float(jnp.abs(adapters["layers"]["attn"]["q_proj"]["kernel"]["b"]).max()) > 0
  assert adapters["layers"]["attn"]["q_proj"]["kernel"]["a"].shape == (2, 32, 8)
  np.testing.assert_allclose(jlora_logits(model_dir, params, adapters, spec), want,
                             atol=1e-4, rtol=0)
  without = jlora_logits(model_dir)
  assert np.abs(without - want).max() > 1e-2  # the adapter changes the output

  assert cli.main(["import-peft", str(tmp_path / "adapter"), "--model", model_dir]) == 0
  # Training can start from it: lora.init in a run config.
  cfg = config.from_dict({"run_dir": str(tmp_path / "run"), "model": {"path": model_dir},
                          "lora": {"init": str(tmp_path / "adapter")},
                          "data": {"source": "task:arithmetic", "batch_size": 8}})
  s = build.build(cfg, log=lambda _: None)
  start = jlora_logits(model_dir, optim.combine(s.trainable["full"], s.frozen),
                       s.trainable["lora"], s.spec)
  np.testing.assert_allclose(start, want, atol=1e-4, rtol=0)


def test_moe_export_uses_per_expert_names_and_round_trips(tmp_path):
  model_dir = tiny_model_dir(str(tmp_path / "base"), "qwen3_moe")
  _, params, cfg = models.load(model_dir)
  spec = models.lora_spec(cfg, 4)
  adapters = randomize_b(lora.init_adapters(params, spec, jax.random.PRNGKey(0)),
                         jax.random.PRNGKey(1))
  out = jpeft.save_peft(str(tmp_path / "peft"), adapters, spec, cfg)
  keys = set(jpeft.safe_open(os.path.join(out, jpeft.ADAPTER_FILE), "np").keys())
  assert ("base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in keys)
  back, spec2, _ = jpeft.load_peft(out, params, cfg)
  for path, f in lora.adapter_leaves(adapters).items():
    g = lora.adapter_leaves(back)[path]
    np.testing.assert_allclose(np.asarray(g["a"]), np.asarray(f["a"]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g["b"]), np.asarray(f["b"]), atol=1e-6)
  want = jlora_logits(model_dir, params, adapters, spec)
  np.testing.assert_allclose(jlora_logits(model_dir, params, back, spec2), want, atol=1e-5)
  # Merged checkpoint of an MoE model: transformers loads it and agrees.
  from jlora import data
  merged.save_merged(str(tmp_path / "merged"), params, adapters, spec, cfg, model_dir,
                     data.Tokenizer.from_model(model_dir))
  np.testing.assert_allclose(torch_logits(hf_model(str(tmp_path / "merged"))), want,
                             atol=1e-4, rtol=0)


def test_bad_adapters_fail_clearly_and_write_nothing(tmp_path, monkeypatch):
  model_dir = tiny_model_dir(str(tmp_path / "base"))
  other_dir = tiny_model_dir(str(tmp_path / "other"), hidden_size=48)
  _, params, cfg = models.load(model_dir)

  def adapter(name, model_path=model_dir, **kw):
    model = peft.get_peft_model(hf_model(model_path), peft.LoraConfig(
        r=4, target_modules=["q_proj", "down_proj"], **kw))
    model.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)

  with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.lora_A.weight' has "
                                       r"shape \(4, 48\).*takes 32 inputs"):
    jpeft.load_peft(adapter("other", other_dir), params, cfg)
  with pytest.raises(ValueError, match="DoRA"):
    jpeft.load_peft(adapter("dora", use_dora=True), params, cfg)
  with pytest.raises(ValueError, match="bias='all'"):
    jpeft.load_peft(adapter("bias", bias="all"), params, cfg)
  # An adapter naming a module this model does not have.
  path = adapter("renamed")
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(path, jpeft.ADAPTER_FILE))
  tensors = {k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()}
  save_file(tensors, os.path.join(path, jpeft.ADAPTER_FILE))
  with pytest.raises(ValueError, match="unknown target module 'model.layers.0.self_attn.qkv"):
    jpeft.load_peft(path, params, cfg)
  # CLI: one line, exit 2, and no output directory left behind on failure.
  assert cli.main(["import-peft", str(tmp_path / "dora"), "--model", model_dir]) == 2
  assert cli.main(["export", str(tmp_path / "nowhere"), "--format", "peft",
                   "--out", str(tmp_path / "x")]) == 2
  assert not (tmp_path / "x").exists()
  # A failure mid-write (here: the disk) leaves neither the output nor a temp dir behind.
  spec = models.lora_spec(cfg, 2, targets=["mlp"])
  adapters = lora.init_adapters(params, spec, jax.random.PRNGKey(0))

  def disk_full(*args, **kw):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(jpeft, "save_file", disk_full)
  with pytest.raises(ValueError, match="nothing was written.*no space left on device"):
    jpeft.save_peft(str(tmp_path / "y"), adapters, spec, cfg)  # one line for the CLI
  assert not [p for p in os.listdir(tmp_path) if "y" in p]
