"""jlora.study.runner: the arm hash follows the resolved config, a diverged arm is kept and
marked, the late loss is the mean of the last quarter."""

import json
import math

import pytest

from jlora.study import assets, runner


def test_late_loss_is_the_mean_of_the_last_quarter():
  rows = [{"step": 0, "eval_loss": 9.0}] + [{"step": s, "loss": float(s)} for s in range(1, 9)]
  r = runner.ArmResult(runner.Arm("a", "s", 1, {}), "h", "done", {}, rows, 1.0)
  assert r.late_loss() == 7.5  # steps 7 and 8 (> 6 = 3/4 of 8)
  assert runner.ArmResult(r.arm, "h", "diverged", {}, rows, 1.0).late_loss() is None


def test_arm_hash_follows_the_resolved_config(tmp_path):
  values = {"data": {"source": "task:arithmetic"}, "train": {"steps": 3}}
  arm = runner.Arm("a", "s", 1, {"lora": {"rank": 2}})
  cfg, h = runner.arm_config(values, arm, str(tmp_path))
  assert cfg.lora.rank == 2 and cfg.train.steps == 3 and cfg.run_dir.endswith(f"a-{h}")
  assert runner.arm_config(values, arm, str(tmp_path / "elsewhere"))[1] == h
  other = runner.arm_config({**values, "train": {"steps": 4}}, arm, str(tmp_path))[1]
  assert other != h
  with pytest.raises(ValueError, match="lora.rnak"):
    runner.arm_config(values, runner.Arm("b", "s", 1, {"lora": {"rnak": 2}}), str(tmp_path))


def test_a_diverged_arm_is_kept_and_marked(tmp_path):
  model = assets.tiny_model(str(tmp_path / "model"), hidden=32)
  values = {"model": {"path": model, "remat": False},
            "data": {"source": "task:arithmetic", "chat": False, "seq_len": 32,
                     "batch_size": 8, "prefetch": 0},  # 8 fake devices in tests
            "train": {"steps": 4, "log_every": 1, "checkpoint_every": 4, "grad_clip": 0.0},
            "eval": {"batches": 1, "examples": 0}}
  arms = [runner.Arm("ok", "s", 1e-3, {"train": {"lr": 1e-3}}),
          runner.Arm("boom", "s", 1e30, {"train": {"lr": 1e30}})]
  results = runner.run_arms("t", arms, values, str(tmp_path / "out"), log=lambda _: None)
  ok, boom = results
  assert ok.status == "done" and math.isfinite(ok.final())
  assert boom.status == "diverged" and boom.final() is None and "non-finite" in boom.message
  rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
  assert {r["arm"] for r in rows} == {"ok", "boom"}
  assert [r["status"] for r in rows if r["arm"] == "boom"][0] == "diverged"
  # Running again skips both (the diverged arm is not retried).
  log = []
  again = runner.run_arms("t", arms, values, str(tmp_path / "out"), log=log.append)
  assert [r.status for r in again] == ["done", "diverged"]
  assert all("skipped" in line for line in log)
