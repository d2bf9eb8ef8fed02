"""jlora.run.build: everything knowable is checked before the run directory exists (the
preflight), data with nothing to train on, the MoE expert-rank rule as a config choice."""

import json

import pytest

from jlora import cli, models
from jlora.findings import advisor
from jlora.run import build, config
from tests.helpers import recipe, tiny_model_dir, write_toml


def test_the_expert_rank_rule_is_a_config_choice(tmp_path, capsys):
  model_dir = tiny_model_dir(str(tmp_path / "base"), "qwen3_moe")  # 4 experts, 2 per token
  for rule, per_expert in (("active", 2), ("all", 1), ("same", 4)):
    values = {"run_dir": str(tmp_path / rule), "model": {"path": model_dir},
              "lora": {"rank": 4, "expert_rank": rule},
              "data": {"source": "task:arithmetic", "batch_size": 8}}
    plan = build.abstract_plan(config.from_dict(values), models.read_config(model_dir))
    ranks = {p: t.rank for p, t in plan.targets.items()}
    assert ranks["layers/moe/up_proj/kernel"] == per_expert
    assert ranks["layers/attn/q_proj/kernel"] == 4
    findings = advisor.advise_run(config.from_dict(values), models.read_config(model_dir),
                                  plan=plan)
    assert any(f"each expert r={per_expert} (r // " in f.message for f in findings)
  s = build.build(config.from_dict(values), log=lambda _: None)  # the line a run prints
  assert "(experts r=4 each: r // 1, lora.expert_rank = 'same')" in build.describe(s)
  values["lora"]["expert_rank"] = "half"
  with pytest.raises(ValueError, match="lora.expert_rank 'half' is not one of active, all"):
    config.from_dict(values)


@pytest.mark.parametrize("override,message", [
    ("model.path='/no/such/model'", "/no/such/model"),
    ("eval.source='/no/such/held_out.jsonl'", "/no/such/held_out.jsonl"),
    ("lora.init='/no/such/adapter'", "/no/such/adapter"),
    ("mesh.data=3", "mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are available"),
    ("train.grad_accum=3", "data.batch_size=8 is not divisible by train.grad_accum=3"),
    ("train.lr=inf", "train.lr must be a finite number > 0, got inf"),
    ("data.seq_len=100000", "data.seq_len=100000 exceeds the model's maximum positions (256)"),
])
def test_everything_knowable_is_checked_before_the_run_dir_exists(model_dir, tmp_path, capsys,
                                                                 override, message):
  run = tmp_path / "run"
  toml = write_toml(tmp_path / "r.toml", recipe(model_dir, run))
  assert cli.main(["train", toml, "--set", override]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err
  assert not run.exists()  # so a corrected rerun (or --resume) is not blocked by it


def test_data_with_nothing_to_train_on_is_an_error(model_dir, tmp_path, capsys):
  data = tmp_path / "long_prompts.jsonl"
  with open(data, "w") as f:
    for i in range(20):
      f.write(json.dumps({"prompt": "x " * 80 + str(i), "completion": "done"}) + "\n")
  values = recipe(model_dir, tmp_path / "run")
  values["data"] = {"source": str(data), "seq_len": 32, "batch_size": 8}
  values["eval"] = {"batches": 0, "examples": 0}
  assert cli.main(["train", write_toml(tmp_path / "r.toml", values)]) == 2
  err = capsys.readouterr().err
  assert (f"data.source '{data}' has no trainable tokens: 20 examples, 640 tokens, 0 with "
          "loss (20 truncated at data.seq_len=32") in err
  assert not (tmp_path / "run").exists()
