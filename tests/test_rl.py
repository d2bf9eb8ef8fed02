"""RL with LoRA: the policy-gradient loss against an independent computation, PPO's clip,
group centring, KL at init, sampling vs greedy generate, the sharded step, and ``jlora rl``
end to end (metrics, export, a failing reward, resume after SIGKILL)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import models
from jlora.core import optim
from jlora.objectives import lm
from jlora.run import train_step
from jlora.infra import mesh as mesh_lib
from jlora.models import ModelConfig, Transformer
from jlora.objectives.rl import losses, rollouts
from tests.helpers import randomize_b

CFG = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)
PROMPT_LENS, N = [5, 3, 7, 4], 6  # four prompts of different lengths, 6 new tokens at most


def _policy(seed=0, b_scale=0.3):
  """(model, plan, trainable, frozen): a tiny random model with non-zero LoRA B."""
  model = Transformer(CFG)
  params = model.init(jax.random.PRNGKey(seed), jnp.ones((1, 4), jnp.int32))["params"]
  params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                  is_leaf=lambda x: hasattr(x, "value"))
  plan = jlora.core.lora.plan(params, models.lora_spec(CFG, rank=2))
  adapters = jlora.init_adapters(params, plan, jax.random.PRNGKey(seed + 1))
  if b_scale:
    adapters = randomize_b(adapters, jax.random.PRNGKey(seed + 2), b_scale)
  trainable, frozen = optim.trainable(params, adapters, plan)
  return model, plan, trainable, frozen


def _episodes(seed=0, group=2):
  """Hand-made episodes: 4 prompts x ``group`` rows, left-padded prompts, completions of
  lengths 1..N (shorter ones end in EOS = 1 and are padded after it)."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(2, CFG.vocab_size, n) for n in PROMPT_LENS for _ in range(group)]
  tokens_, mask = rollouts.left_pad(prompts, max(PROMPT_LENS) + 1)
  B = len(prompts)
  lengths = rng.integers(1, N + 1, B)
  tokens = rng.integers(2, CFG.vocab_size, (B, N)).astype(np.int32)
  for i, n in enumerate(lengths):
    if n < N:
      tokens[i, n - 1], tokens[i, n:] = 1, 1
  ep = rollouts.Episodes([{}] * B, tokens_, mask, tokens, np.zeros((B, N), np.float32),
                         lengths, [""] * B)
  return ep, prompts


def _independent_logprobs(model, params, prompts, ep):
  """Each row alone, unpadded (positions 0..), its completion's log-probs: no masks, no
  left padding, no chunking, no shift bookkeeping shared with the code under test."""
  out = []
  for prompt, tokens, n in zip(prompts, ep.tokens, ep.lengths):
    seq = jnp.asarray(np.concatenate([prompt, tokens[:n]]))[None]
    logits, _ = model.apply({"params": params}, seq)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, seq[0, 1:, None], axis=-1)[:, 0]
    out.append(picked[-n:])
  return out


def test_group_centering_and_constant_groups():
  np.testing.assert_array_equal(losses.advantages([1, 0, 0, 1], 4), [0.5, -0.5, -0.5, 0.5])
  np.testing.assert_allclose(losses.advantages([1, 0, 0, 1, 3, 1], 3),
                             [2 / 3, -1 / 3, -1 / 3, -2 / 3, 4 / 3, -2 / 3], rtol=1e-6)
  np.testing.assert_allclose(losses.advantages([1, 0, 0, 1], 4, normalize_std=True),
                             [1, -1, -1, 1], rtol=1e-5)
  np.testing.assert_array_equal(losses.constant_groups([1, 1, 0, 1, 2, 2], 2),
                                [True, True, False, False, True, True])


def test_ppo_clip_region_is_exact_at_the_boundaries():
  eps = 0.2
  r = jnp.asarray([0.7, 0.8, 1.0, 1.2, 1.3], jnp.float32)  # 0.8 and 1.2: the boundaries
  for adv, want, clipped in (
      (1.0, [-0.7, -0.8, -1.0, -1.2, -1.2], [0, 0, 0, 0, 1]),
      (-1.0, [0.8, 0.8, 1.0, 1.2, 1.3], [1, 0, 0, 0, 0])):
    loss, was = losses.per_token(r, jnp.float32(adv), "ppo", eps)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_array_equal(was, clipped)
    # strictly inside: the gradient is -A; strictly past the clip in A's favour: 0
    grad = jax.grad(lambda x: jnp.sum(losses.per_token(x, adv, "ppo", eps)[0]))(r)
    strict = np.array([0, 2, 4])
    np.testing.assert_allclose(np.asarray(grad)[strict],
                               [-adv if c == 0 else 0.0 for c in np.asarray(clipped)[strict]])
  loss, _ = losses.per_token(r, jnp.float32(2.0), "importance_sampling", eps)
  np.testing.assert_allclose(loss, -2.0 * np.asarray(r))


@pytest.mark.parametrize("off_policy", [False, True])
def test_policy_gradient_equals_an_independent_computation(off_policy):
  model, plan, trainable, frozen = _policy()
  ep, prompts = _episodes()
  adv = np.random.default_rng(1).normal(size=len(prompts)).astype(np.float32)
  batch = rollouts.training_batch(ep, adv, np.ones(len(prompts), bool))
  params = optim.model_params(trainable, frozen, plan)
  learner = lm.token_logprobs(model, params, batch, chunk=16, last=N)
  shift = np.random.default_rng(2).normal(0, 0.1, learner.shape) if off_policy else 0.0
  batch["sampler_logprobs"] = np.asarray(learner + shift, np.float32) * batch["mask"]
  loss_fn = losses.policy_loss(model, plan, chunk=16)
  total, count, aux = loss_fn(trainable, frozen, batch)
  assert count == sum(ep.lengths)
  if not off_policy:  # on-policy the ratio is 1, exactly
    assert float(aux["ratio_min"]) == float(aux["ratio_max"]) == 1.0
    assert float(aux["ratio_mean"]) == float(count)
  # The sampler's log-probs, per row, in the independent layout.
  fixed = [np.asarray(batch["sampler_logprobs"][i, :n])
           for i, n in enumerate(ep.lengths)]

  def independent(tr):  # -sum_t A * p / p_sampler, mean over the batch's tokens
    logps = _independent_logprobs(model, optim.model_params(tr, frozen, plan), prompts, ep)
    terms = [a * jnp.exp(lp - f) for a, lp, f in zip(adv, logps, fixed)]
    return -sum(jnp.sum(t) for t in terms) / sum(ep.lengths)

  got = jax.jit(jax.grad(lambda tr: loss_fn(tr, frozen, batch)[0] / count))(trainable)
  want = jax.jit(jax.grad(independent))(trainable)
  if not off_policy:  # on-policy it is REINFORCE: -sum_t A grad log p
    reinforce = jax.jit(jax.grad(lambda tr: -sum(
        a * jnp.sum(lp) for a, lp in zip(adv, _independent_logprobs(
            model, optim.model_params(tr, frozen, plan), prompts, ep))) / sum(ep.lengths)))
    for x, y in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(reinforce(
        trainable))):
      np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-6)
  # atol: f32 gradients of two layouts of the same sums, ~1e-4 of the largest element
  # (observed 2e-6 off-policy); a missing or inverted importance ratio moves them by ~10%.
  scale = max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(got))
  for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4 * scale)
  assert scale > 1e-4


def test_kl_to_the_base_is_zero_at_init_and_positive_after():
  for b_scale, zero in ((0.0, True), (0.3, False)):
    model, plan, trainable, frozen = _policy(b_scale=b_scale)
    ep, _ = _episodes()
    batch = rollouts.training_batch(ep, np.ones(8, np.float32), np.ones(8, bool))
    batch["sampler_logprobs"] = np.zeros_like(batch["mask"])
    # the reference: the base with adapters off (the frozen params themselves)
    batch["ref_logprobs"] = losses.reference_logprobs(model)(
        optim.combine(trainable["full"], frozen), batch)
    _, count, aux = losses.policy_loss(model, plan, kl_coef=0.1)(trainable, frozen, batch)
    kl = float(aux["kl"]) / float(count)
    assert (kl == 0.0) if zero else kl > 1e-4


def test_sampling_at_temperature_zero_equals_greedy_generate():
  model, plan, trainable, frozen = _policy()
  params = optim.model_params(trainable, frozen, plan)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(2, CFG.vocab_size, n) for n in PROMPT_LENS]
  alone = [np.asarray(models.generate(model, params, jnp.asarray(p)[None], max_new_tokens=N)[0])
           for p in prompts]
  eos = int(alone[0][2])  # row 0 stops at its 3rd token; others where this id appears
  tokens, mask = rollouts.left_pad(prompts, 8)
  out = models.sample(model, params, tokens, mask, jax.random.PRNGKey(3), group=3,
                      max_new_tokens=N, temperature=0.0, eos_id=eos, pad=0)
  for u, want in enumerate(alone):
    n = list(want).index(eos) + 1 if eos in want else N
    for g in range(3):
      row = 3 * u + g
      assert int(out.lengths[row]) == n
      np.testing.assert_array_equal(out.tokens[row, :n], want[:n])
      assert np.all(np.asarray(out.tokens[row, n:]) == 0)
  # The recorded log-probs are the learner's (up to float rounding of the cached decode).
  ep = rollouts.Episodes([{}] * 12, np.repeat(tokens, 3, 0), np.repeat(mask, 3, 0),
                         np.asarray(out.tokens), np.asarray(out.logprobs),
                         np.asarray(out.lengths), [""] * 12)
  batch = rollouts.training_batch(ep, np.zeros(12, np.float32), np.ones(12, bool))
  learner = np.asarray(lm.token_logprobs(model, params, batch, last=N)) * batch["mask"]
  np.testing.assert_allclose(learner, np.asarray(out.logprobs), atol=2e-5)
  full = np.asarray(lm.token_logprobs(model, params, batch, chunk=5))  # every position
  np.testing.assert_allclose(full[:, -N:] * batch["mask"], learner, atol=1e-5)


def test_top_p_keeps_the_nucleus():
  model, plan, trainable, frozen = _policy()
  params = optim.model_params(trainable, frozen, plan)
  tokens = np.asarray([[5, 6, 7, 8]] * 2, np.int32)
  greedy = models.sample(model, params, tokens, np.ones_like(tokens), jax.random.PRNGKey(1),
                         group=4,
                         max_new_tokens=5, temperature=0.0)
  tiny_p = models.sample(model, params, tokens, np.ones_like(tokens), jax.random.PRNGKey(0),
                         group=4, max_new_tokens=5, temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)  # only the top token is left
  free = models.sample(model, params, tokens, np.ones_like(tokens), jax.random.PRNGKey(0),
                       group=4, max_new_tokens=5, temperature=1.0)
  assert not np.array_equal(free.tokens, greedy.tokens)


def _rl_steps(mesh, steps=3):
  model, plan, trainable, frozen = _policy()
  trainable = jax.device_put(trainable, mesh_lib.replicated(mesh))
  frozen = jax.device_put(frozen, mesh_lib.replicated(mesh))
  tx = optim.optimizer(1e-2)
  step, state = train_step.build(losses.policy_loss(model, plan), tx, trainable, frozen, mesh)
  ep, _ = _episodes(group=2)
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


# ----------------------------------------------------------------------------- jlora rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  from tests.helpers import tiny_model_dir
  return tiny_model_dir(str(tmp_path_factory.mktemp("model")))


def rl_recipe(model_dir, run_dir, reward="tests.rl_rewards:digits", **rl):
  return {"run_dir": str(run_dir), "model": {"path": model_dir, "remat": False},
          "train": {"steps": 6, "checkpoint_every": 2, "lr": 1e-2, "keep": 3},
          "data": {"source": "task:arithmetic", "size": 64},
          "eval": {"examples": 4},
          "rl": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 5,
                 "reward": reward, **rl}}


def _write(path, values):
  from tests.test_trainer import write_toml
  return write_toml(path, values)


def _jlora_rl(toml, *args, env=None):
  return subprocess.run([sys.executable, "-m", "jlora.cli", "rl", toml, "--no-progress", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


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
  assert "\nOK    rl        RL: 6 steps x 8 episodes x <= 1 bit = 48 bits vs 2 bits x 1,024 " \
      "LoRA params" in "\n".join(lines)  # rank 1 on the tiny model: 1,024 parameters
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(7))
  for r in rows[1:]:
    for key in ("reward_mean", "reward_std", "kl", "ratio_min", "ratio_mean", "ratio_max",
                "clip_frac", "sampled_tokens_per_s", "tokens_per_s", "sample_s", "step_s"):
      assert key in r, key
    assert r["ratio_min"] <= r["ratio_mean"] <= r["ratio_max"]
    assert 0.0 <= r["clip_frac"] <= 1.0 and r["kl"] >= 0.0
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
  toml = _write(tmp_path / "flaky.toml", rl_recipe(model_dir, tmp_path / "run",
                                                    reward="tests.rl_rewards:flaky"))
  out = _jlora_rl(toml, env={"JLORA_TEST_REWARD_CALLS": str(calls)})
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("jlora: error: reward tests.rl_rewards:flaky raised KeyError: "
                         "\"no such field: 'solution'\" (record ")
  assert "Traceback" not in out.stderr
  steps = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert steps == [2]  # step 4 was never reached; step 2 is intact and resumable
  from jlora.run import trained
  assert trained.load_trained(str(tmp_path / "run")).step == 2
  nan = _write(tmp_path / "nan.toml", rl_recipe(model_dir, tmp_path / "nan",
                                                  reward="tests.rl_rewards:nan"))
  out = _jlora_rl(nan)
  assert out.returncode == 2 and "reward tests.rl_rewards:nan returned nan (record" in \
      out.stderr.strip().splitlines()[-1]
  bad = _write(tmp_path / "bad.toml", rl_recipe(model_dir, tmp_path / "bad",
                                                  reward="tests.nowhere:fn"))
  out = _jlora_rl(bad)
  assert out.returncode == 2 and not (tmp_path / "bad").exists()
  assert "rl.reward 'tests.nowhere:fn': cannot import 'tests.nowhere'" in out.stderr


@pytest.mark.slow
def test_rl_resume_after_sigkill_is_bit_exact(model_dir, tmp_path):
  from safetensors.numpy import load_file
  ref = _write(tmp_path / "ref.toml", rl_recipe(model_dir, tmp_path / "ref"))
  assert _jlora_rl(ref).returncode == 0
  want = load_file(tmp_path / "ref" / "adapters.safetensors")
  # global_batch calls: held-out prompts (1), then 2 per step (prompts, training batch):
  # call 10 is step 5's prompts, after the step-4 checkpoint.
  toml = _write(tmp_path / "kill.toml", rl_recipe(model_dir, tmp_path / "kill"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "JLORA_WORKER_COMMAND": "rl"}
  killed = subprocess.run([sys.executable, "-m", "tests.train_worker", toml, "step", "10"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert not (tmp_path / "kill" / "adapters.safetensors").exists()
  resumed = _jlora_rl(toml, "--resume")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed" in resumed.stdout + resumed.stderr
  got = load_file(tmp_path / "kill" / "adapters.safetensors")
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert any(np.abs(v).max() > 0 for k, v in want.items() if k.endswith("/b"))
  rows = [json.loads(x) for x in (tmp_path / "kill" / "metrics.jsonl").read_text().splitlines()]
  ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(7))
  assert [r.get("reward_mean") for r in rows] == [r.get("reward_mean") for r in ref_rows]


def test_answer_parsing_and_format():
  from jlora.objectives.rl import rewards
  cases = {"37 + 48 = 85": "85", "The answer is 1,024.": "1024", "#### -7": "-7",
           "so \\boxed{12} and then 5": "12", "3 apples, 4 pears: 7.0": "7",
           "Answer: 42, not 41": "42", "no digits": None, "85": "85"}
  for text, want in cases.items():
    assert rewards.final_answer(text) == want, text
  assert rewards.correct("It is 85.", "85") and not rewards.correct("It is 58.", "85")
  assert rewards.formatted(" 85. ") and rewards.formatted("the answer is 85")
  assert not rewards.formatted("85 is what 37 + 48 gives")
  assert rewards.score(rewards.answer_reward, "answer", "", "85", {"answer": "85"}, 0,
                       format_reward=0.1) == pytest.approx(1.1)
  with pytest.raises(ValueError, match="expected 'answer' or 'module:function'"):
    rewards.load("answers")
  with pytest.raises(ValueError, match="has no function 'nope'"):
    rewards.load("tests.rl_rewards:nope")


def test_word_problems_have_the_integer_answers_their_text_implies():
  import re
  from jlora.data import tasks
  train = tasks.source("word_problems", "train", size=300)
  test = tasks.source("word_problems", "test", size=60)
  assert not {train[i]["prompt"] for i in range(300)} & {test[i]["prompt"] for i in range(60)}
  for i in range(60):
    r = test[i]
    n = [int(x) for x in re.findall(r"\d+", r["prompt"])]
    p = r["prompt"]
    want = (n[0] + n[1] * n[2] - n[3] if "apples" in p else n[2] - n[0] * n[1] if "change" in p
            else n[0] * n[1] + n[2] if "km" in p else n[0] * n[1] - n[2] if "chairs" in p
            else n[0] * n[1] + n[2] * n[3])
    assert r["answer"] == str(want) and want >= 0, p


def test_rl_config_defaults_and_errors():
  from jlora.run import config
  base = {"run_dir": "r", "data": {"source": "task:arithmetic"}}
  cfg = config.from_dict({**base, "rl": {}})
  assert cfg.lora.rank == 1 and cfg.rl.loss == "importance_sampling" and cfg.rl.clip == 0.2
  assert config.from_dict({**base, "rl": {}, "lora": {"rank": 8}}).lora.rank == 8
  assert config.from_dict(base).rl is None and config.from_dict(base).lora.rank == 16
  with pytest.raises(ValueError, match=r"unknown config key 'rl.grup_size' \(did you mean "
                                       r"'rl.group_size'\?\)"):
    config.from_dict({**base, "rl": {"grup_size": 4}})
  with pytest.raises(ValueError, match="rl.loss 'grpo' is not"):
    config.from_dict({**base, "rl": {"loss": "grpo"}})
  with pytest.raises(ValueError, match=r"rl.clip must be in \(0, 1\)"):
    config.from_dict({**base, "rl": {"clip": 1.5}})
  with pytest.raises(ValueError, match="rl.group_size must be >= 2, got 1: advantages are "
                                       "rewards minus their group's mean"):
    config.from_dict({**base, "rl": {"group_size": 1}})
  shipped = config.load(os.path.join(ROOT, "configs", "rl_arithmetic.toml"))
  assert shipped.lora.rank == 1 and shipped.lora.alpha == 32 and shipped.train.lr is None
  assert shipped.train.schedule == "constant" and shipped.rl.kl_coef == 0.0
  from jlora.objectives import sft
  with pytest.raises(ValueError, match="has the section \\[rl\\]: run it with jlora rl"):
    sft.run(config.from_dict({**base, "rl": {}}))


def test_rl_mistakes_are_caught_before_the_run_dir_exists_and_resume_keeps_rl(model_dir,
                                                                             tmp_path):
  from jlora.objectives import rl
  from jlora.run import config, rundir
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


def test_a_reward_failing_before_training_leaves_nothing_that_blocks_a_rerun(
    model_dir, tmp_path, monkeypatch, capsys):
  from jlora import cli
  calls = tmp_path / "calls"
  calls.write_text("0")  # the first call (the evaluation before training) raises
  monkeypatch.setenv("JLORA_TEST_REWARD_CALLS", str(calls))
  toml = _write(tmp_path / "r.toml", rl_recipe(model_dir, tmp_path / "run",
                                              reward="tests.rl_rewards:flaky"))
  assert cli.main(["rl", toml, "--no-progress", "--set", "train.steps=2"]) == 2
  assert "reward tests.rl_rewards:flaky raised KeyError" in capsys.readouterr().err
  assert (tmp_path / "run" / "config.json").exists()
  calls.write_text("1000")
  assert cli.main(["rl", toml, "--no-progress", "--set", "train.steps=2"]) == 0
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 1, 2]
