"""jlora.objectives.rl: the RL objective on the shared run: the sharded step equals one device,
``jlora rl`` end to end (metrics, export), a failing reward is one line and keeps the
checkpoints, mistakes caught before the run directory exists."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from jlora.core import optim
from jlora.infra import mesh as mesh_lib
from jlora.objectives.rl import losses, rollouts
from jlora.run import train_step
from tests.helpers import hand_episodes, jlora_rl, rl_recipe, tiny_policy, write_toml


def _rl_steps(mesh, steps=3):
  model, plan, trainable, frozen = tiny_policy()
  trainable = jax.device_put(trainable, mesh_lib.replicated(mesh))
  frozen = jax.device_put(frozen, mesh_lib.replicated(mesh))
  tx = optim.optimizer(1e-2)
  step, state = train_step.build(losses.policy_loss(model, plan), tx, trainable, frozen, mesh)
  ep, _ = hand_episodes(group=2)
  adv = losses.advantages(np.arange(8.0) % 3, 2)
  batch = rollouts.training_batch(ep, adv, np.ones(8, bool))
  batch["sampler_logprobs"] = batch["sampler_logprobs"] - 0.05 * batch["mask"]
  out = []
  for _ in range(steps):
    state, m = step(state, frozen, mesh_lib.global_batch(batch, mesh))
    out.append([float(m[k]) for k in ("loss", "grad_norm", "ratio_min", "ratio_max")])
  return np.asarray(out)


def test_rl_step_on_8_devices_equals_one_device():
  assert len(jax.devices()) == 8
  one = _rl_steps(mesh_lib.make_mesh(mesh_lib.MeshConfig(), jax.devices()[:1]))
  eight = _rl_steps(mesh_lib.make_mesh(mesh_lib.MeshConfig(data=-1)))
  np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)
  assert one[0, 0] != one[-1, 0]  # it moves


def test_jlora_rl_end_to_end_metrics_and_export(model_dir, tmp_path, monkeypatch):
  from jlora.objectives import rl
  from jlora.run import config
  plugin = tmp_path / "my_reward.py"  # a user's reward module, gone after training
  plugin.write_text("from tests.rl_rewards import digits\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  cfg = config.from_dict(rl_recipe(model_dir, tmp_path / "run", reward="my_reward:digits",
                                   loss="ppo", kl_coef=0.05))  # an [rl] section: RL's defaults
  assert cfg.lora.rank == 1 and cfg.lora.alpha == 32 and cfg.train.schedule == "constant"
  lines = []
  summary = rl.run(cfg, progress=False, log=lines.append)
  assert "\nOK    rl        RL: 6 steps x 8 episodes x <= 1 bit = 48 bits vs 2 bits x 1,024 "\
      "LoRA params" in "\n".join(lines)  # rank 1 on the tiny model: 1,024 parameters
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(7))
  for r in rows[1:]:
    for key in ("reward_mean", "reward_std", "kl", "ratio_min", "ratio_mean", "ratio_max",
                "clip_frac", "sampled_tokens_per_s", "tokens_per_s", "sample_s", "step_s"):
      assert key in r, key
    # one update per sampled batch: the trainer's log-probs are the sampler's (same
    # parameters, another program), so every ratio is 1 to float precision and PPO clips
    # nothing; stale sampling parameters or misaligned tokens move them far from 1
    assert 1 - 1e-3 < r["ratio_min"] <= r["ratio_mean"] <= r["ratio_max"] < 1 + 1e-3, r
    assert r["clip_frac"] == 0.0
  assert rows[1]["kl"] < 1e-6 < rows[-1]["kl"]  # sampled before the first update: B = 0
  assert abs(rows[1]["ratio_min"] - 1) < 1e-4 and abs(rows[1]["ratio_max"] - 1) < 1e-4
  assert len({r["reward_mean"] for r in rows[1:]}) > 1
  assert summary["accuracy_before"] == rows[0]["accuracy"]
  assert summary["eval_reward_after"] == rows[-1]["eval_reward"]
  # Reading the run back never calls the reward, so it needs no reward module.
  plugin.unlink()
  sys.modules.pop("my_reward")
  out, run = tmp_path / "peft", str(tmp_path / "run")
  from jlora import cli
  assert cli.main(["export", run, "--out", str(out)]) == 0
  adapter_cfg = json.loads((out / "adapter_config.json").read_text())
  assert adapter_cfg["r"] == 1 and adapter_cfg["lora_alpha"] == 32
  assert cli.main(["generate", run, "--prompt", "What is 1 plus 1?",
                   "--max-new-tokens", "2"]) == 0
  assert cli.main(["merge", run, "--out", str(tmp_path / "merged")]) == 0
  from jlora.run import build
  with pytest.raises(ValueError, match="cannot import 'my_reward'"):  # training still needs it
    build.preflight(cfg, rl.RL.rules)


def test_a_failing_reward_is_one_line_and_keeps_the_checkpoints(model_dir, tmp_path):
  calls = tmp_path / "calls"
  calls.write_text(str(8 * 3 + 4 * 1 + 3))  # eval (4 rows), 3 steps of 8, then 3 more
  toml = write_toml(tmp_path / "flaky.toml", rl_recipe(model_dir, tmp_path / "run",
                                                    reward="tests.rl_rewards:flaky"))
  out = jlora_rl(toml, env={"JLORA_TEST_REWARD_CALLS": str(calls)})
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("jlora: error: reward tests.rl_rewards:flaky raised KeyError: "
                         "\"no such field: 'solution'\" (record ")
  assert "Traceback" not in out.stderr
  steps = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert steps == [2]  # step 4 was never reached; step 2 is intact and resumable
  from jlora.run import trained
  assert trained.load_trained(str(tmp_path / "run")).step == 2
  nan = write_toml(tmp_path / "nan.toml", rl_recipe(model_dir, tmp_path / "nan",
                                                  reward="tests.rl_rewards:nan"))
  out = jlora_rl(nan)
  assert out.returncode == 2 and "reward tests.rl_rewards:nan returned nan (record" in\
      out.stderr.strip().splitlines()[-1]
  bad = write_toml(tmp_path / "bad.toml", rl_recipe(model_dir, tmp_path / "bad",
                                                  reward="tests.nowhere:fn"))
  out = jlora_rl(bad)
  assert out.returncode == 2 and not (tmp_path / "bad").exists()
  assert "rl.reward 'tests.nowhere:fn': cannot import 'tests.nowhere'" in out.stderr


def test_rl_mistakes_are_caught_before_the_run_dir_exists_and_resume_keeps_rl(model_dir,
                                                                             tmp_path):
  from jlora.objectives import rl
  from jlora.run import config, driver, rundir
  values = rl_recipe(model_dir, tmp_path / "run", max_new_tokens=100000)
  with pytest.raises(ValueError, match=r"prompts of up to \d+ tokens \(padded to rl.bucket\) "
                                       r"\+ rl.max_new_tokens=100000 exceed the model's 256 "
                                       "positions"):
    rl.run(config.from_dict(values), progress=False, log=lambda _: None)
  assert not (tmp_path / "run").exists()
  # The objective's section is part of the trajectory: --resume refuses a changed one.
  cfg = config.from_dict(rl_recipe(model_dir, tmp_path / "run", group_size=2))
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(cfg.to_json())
  changed = config.from_dict(rl_recipe(model_dir, tmp_path / "run", group_size=4))
  with pytest.raises(ValueError, match=r"changed since it started: rl.group_size: 2 -> 4$"):
    rundir.check(changed, resume=True)
  rundir.check(cfg, resume=True)
  # RL runs trained together share one decode and one loss: a differing rl.temperature
  # (or a group's shared key) is one line naming the recipe, before any run directory
  a = write_toml(tmp_path / "a.toml", rl_recipe(model_dir, tmp_path / "ga"))
  b = write_toml(tmp_path / "b.toml", rl_recipe(model_dir, tmp_path / "gb", temperature=0.7))
  with pytest.raises(ValueError, match=r"b.toml: rl.temperature = 0.7, but .*a.toml has 1.0: "
                                       r"runs that train together share model, .*rl.loss"):
    driver.run_group([config.load(a), config.load(b)], rl.RL, [a, b], progress=False,
                     log=lambda _: None)
  assert not (tmp_path / "ga").exists() and not (tmp_path / "gb").exists()


def test_a_reward_failing_before_training_leaves_nothing_that_blocks_a_rerun(
    model_dir, tmp_path, monkeypatch, capsys):
  from jlora import cli
  calls = tmp_path / "calls"
  calls.write_text("0")  # the first call (the evaluation before training) raises
  monkeypatch.setenv("JLORA_TEST_REWARD_CALLS", str(calls))
  toml = write_toml(tmp_path / "r.toml", rl_recipe(model_dir, tmp_path / "run",
                                              reward="tests.rl_rewards:flaky"))
  assert cli.main(["rl", toml, "--no-progress", "--set", "train.steps=2"]) == 2
  assert "reward tests.rl_rewards:flaky raised KeyError" in capsys.readouterr().err
  assert (tmp_path / "run" / "config.json").exists()
  calls.write_text("1000")
  assert cli.main(["rl", toml, "--no-progress", "--set", "train.steps=2"]) == 0
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 1, 2]


def test_updates_per_batch_reuse_the_batch_and_resume_mid_batch_exactly(model_dir, tmp_path,
                                                                       monkeypatch):
  """rl.updates_per_batch = 2 (dapo), in the grouped layout (2 data shards, 2 prompts: each
  prompt once per group): each sampled batch trains two steps, the first on-policy (the
  trainer's log-probs are the sampler's: ratio 1, which a misaligned layout breaks), the
  second off its sampler (ratio != 1, the clip can act); a run stopped between the two
  (its checkpoint holds the batch) resumes to the bits of the run that never stopped."""
  from jlora.objectives import rl
  from jlora.run import config
  from safetensors.numpy import load_file
  layouts, build = [], rollouts.training_batch
  monkeypatch.setattr(rollouts, "training_batch", lambda *a: layouts.append(a[3]) or build(*a))

  def values(run, steps):
    v = rl_recipe(model_dir, tmp_path / run, loss="dapo", updates_per_batch=2)
    v["train"] = {**v["train"], "steps": steps, "checkpoint_every": 1}
    v["mesh"] = {"data": 2, "tensor": 4}
    return v

  rl.run(config.from_dict(values("straight", 4)), progress=False, log=lambda _: None)
  rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text()
          .splitlines()][1:]
  assert rows[0]["reward_mean"] == rows[1]["reward_mean"]  # one batch, two updates
  assert rows[2]["reward_mean"] == rows[3]["reward_mean"]
  assert rows[1]["sample_s"] == 0.0 < rows[0]["sample_s"]
  # the second batch's (the first one's rewards were all equal: no update)
  first = max(abs(rows[2]["ratio_max"] - 1), abs(rows[2]["ratio_min"] - 1))
  second = max(abs(rows[3]["ratio_max"] - 1), abs(rows[3]["ratio_min"] - 1))
  assert rows[2]["grad_norm"] > 0 and first < 1e-4 < 1e-2 < second  # then off-policy
  assert layouts == [4, 4]  # group_size: grouped
  rl.run(config.from_dict(values("stopped", 3)), progress=False, log=lambda _: None)
  rl.run(config.from_dict(values("stopped", 4)), resume=True, progress=False,
         log=lambda _: None)
  got = load_file(tmp_path / "stopped" / "adapters.safetensors")
  want = load_file(tmp_path / "straight" / "adapters.safetensors")
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_runs_of_one_group_size_prefill_each_prompt_once_and_train_as_alone(model_dir,
                                                                            tmp_path):
  """``jlora rl A B`` with one ``rl.group_size`` (a study's arms): the group samples each
  prompt once for its group of samples (``rollouts.sample_together``) and trains the
  grouped layout; each run's sampled rewards per step are its solo run's and its adapters
  its solo run's within float noise (8 devices, as the solo runs)."""
  from safetensors.numpy import load_file

  from jlora.objectives import rl
  from jlora.run import config, driver

  def cfg(name, **changes):
    values = rl_recipe(model_dir, tmp_path / name, group_size=2, prompts_per_step=8)
    values["train"] = {**values["train"], "steps": 3, "lr": 1e-3, "checkpoint_every": 3}
    for section, v in changes.items():
      values[section] = {**values.get(section, {}), **v}
    return config.from_dict(values)

  b = {"lora": {"rank": 2}, "train": {"seed": 3}, "data": {"seed": 2}}
  driver.run_group([cfg("a"), cfg("b", **b)], driver.KINDS["rl"], ["a", "b"],
                   progress=False, log=lambda _: None)
  rows = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa
  for name, changes in (("a", {}), ("b", b)):
    rl.run(cfg(f"solo_{name}", **changes), progress=False, log=lambda _: None)
    got, alone = rows(name), rows(f"solo_{name}")
    assert [r.get("reward_mean") for r in got] == [r.get("reward_mean") for r in alone], name
    assert any(r.get("reward_mean") for r in got) and got[1]["completion_tokens"] > 1
    want, solo = (load_file(tmp_path / d / "adapters.safetensors") for d in (name, f"solo_{name}"))
    assert want.keys() == solo.keys()
    for k in solo:
      np.testing.assert_allclose(want[k], solo[k], rtol=0, atol=1e-5, err_msg=f"{name} {k}")
