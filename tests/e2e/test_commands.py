"""The ``jlora`` command end to end on a tiny model: what a user sees during a run, ``jlora
advise`` and the advisor stopping ``jlora train``, ``jlora data build`` / ``stats``, and bad
input exiting 2 without touching a run."""

import json
import os

import jax

from jlora import cli
from jlora.run import config
from tests.helpers import (
  jlora_cli,
  recipe,
  texts,
  write_jsonl,
  write_toml,
)


def test_advise_cli_and_train_refuses_an_error_unless_forced(model_dir, tmp_path,
                                                             capsys):
  good = recipe(model_dir, tmp_path / "run")
  assert cli.main(["advise", write_toml(tmp_path / "good.toml", good)]) == 0
  out = capsys.readouterr().out
  assert "OK    coverage" in out and "[finding 5]" in out
  # 20,000 random facts (132,877 bits) on a rank-1 LoRA of a tiny model: an error.
  big = {**good, "lora": {"rank": 1},
         "data": {**good["data"], "source": "task:facts", "size": 20000}}
  toml = write_toml(tmp_path / "big.toml", big)
  assert cli.main(["advise", toml]) == 1
  assert "ERROR capacity" in capsys.readouterr().out
  assert cli.main(["train", toml, "--no-progress"]) == 2
  assert "--force" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()  # refused before touching the run directory
  assert cli.main(["train", toml, "--no-progress", "--force", "--set", "train.steps=2",
                   "--set", "eval.examples=0"]) == 0


def test_cli_data_build_and_stats(tmp_path, capsys):
  from jlora import cli
  path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts(5)])
  assert cli.main(["data", "build", path, "--out", str(tmp_path / "o"), "--name", "d"]) == 0
  assert os.path.isfile(tmp_path / "o" / "d" / "1.0.0" / "dataset_info.json")
  bad = tmp_path / "bad.jsonl"
  bad.write_text("{]\n")
  assert cli.main(["data", "build", str(bad), "--out", str(tmp_path / "o2"),
                   "--name", "d"]) == 2
  assert "bad.jsonl:1: malformed JSON" in capsys.readouterr().err
  assert cli.main(["data", "build", path, "--out", str(tmp_path / "o3"), "--name", "Bad-Name"]) == 2


def test_what_a_user_sees(model_dir, tmp_path, capsys):
  assert jlora_cli("--version").stdout.strip() == f"jlora {__import__('jlora').__version__}"
  lines, seen = [], []
  from jlora.objectives import sft
  from jlora.run import events
  cfg = config.from_dict(recipe(model_dir, tmp_path / "run", steps=2, checkpoint_every=2))
  sft.run(cfg, progress=False, log=lines.append, on_event=seen.append)
  text = "\n".join(lines)
  # Loading and the first evaluation announce themselves before the silence they cause.
  order = [text.index(s) for s in ("loading llama", "loaded in", "evaluating before training",
                                   "before training: eval_loss")]
  assert order == sorted(order), text
  # What a program subscribes to: every phase once and in order, rows 0..2, a checkpoint
  # before the final row, all on one monotonic clock.
  assert [e.name for e in seen if e.kind == "phase"] == list(events.PHASES)
  assert [e.step for e in seen if e.kind == "row"] == [0, 1, 2]
  names = [e.name if e.kind == "phase" else f"{e.kind} {e.step}" for e in seen]
  assert names.index("checkpoint 2") < names.index("row 2") < names.index("finish")
  assert [e.time for e in seen] == sorted(e.time for e in seen)
  log = tmp_path / "events.jsonl"  # and through the CLI, as a file another process reads
  toml = write_toml(tmp_path / "r.toml", recipe(model_dir, tmp_path / "cli", steps=2))
  assert cli.main(["train", toml, "--no-progress", "--events", str(log)]) == 0
  assert [e.name for e in events.read(str(log)) if e.kind == "phase"] == list(events.PHASES)


def test_bad_input_exits_2_without_touching_runs(model_dir, tmp_path, capsys):
  good = recipe(model_dir, tmp_path / "run")
  toml = write_toml(tmp_path / "bad_key.toml", {**good, "train": {"stpes": 3}})
  assert cli.main(["train", toml]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "did you mean 'train.steps'" in err
  assert cli.main(["train", write_toml(tmp_path / "g.toml", good), "--set",
                   "model.path=/no/such/model"]) == 2
  assert "/no/such/model" in capsys.readouterr().err
  assert cli.main(["train", str(tmp_path / "missing.toml")]) == 2
  assert "no such config file" in capsys.readouterr().err
  if jax.default_backend() == "cpu":  # compiled kernels need a TPU or GPU: refused up front
    toml = write_toml(tmp_path / "k.toml", {**good, "run_dir": str(tmp_path / "k_run")})
    assert cli.main(["train", toml, "--set", "model.lora_impl=pallas"]) == 2
    assert "needs a TPU or GPU" in capsys.readouterr().err
    assert not (tmp_path / "k_run").exists()
  blocker = tmp_path / "a_file"  # a run dir under a regular file cannot be created (as root too)
  blocker.write_text("")
  toml = write_toml(tmp_path / "l.toml", {**good, "run_dir": str(blocker / "run")})
  assert cli.main(["train", toml]) == 2
  assert "cannot write the run directory" in capsys.readouterr().err
  # An existing run is never overwritten, and resume refuses a changed spec.
  existing = tmp_path / "existing"
  (existing / "checkpoints" / "2").mkdir(parents=True)  # a step was saved: a run to keep
  (existing / "config.json").write_text(config.from_dict(recipe(model_dir, existing)).to_json())
  toml = write_toml(tmp_path / "e.toml", recipe(model_dir, existing))
  assert cli.main(["train", toml]) == 2
  assert "already holds a run" in capsys.readouterr().err
  assert cli.main(["train", toml, "--resume", "--set", "lora.rank=8"]) == 2
  assert "changed since it started: lora.rank: 4 -> 8" in capsys.readouterr().err
  assert json.loads((existing / "config.json").read_text())["lora"]["rank"] == 4
