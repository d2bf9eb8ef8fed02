"""jlora.objectives.dpo: every preference loss and its gradient against an independent
computation (each row alone through the model; the reference a separate forward of the
base without adapters, or of base + the starting adapter), log 2 at the start, the
reference holding no copy of the base (live device memory measured), and the [dpo]
section's one-line errors."""

import gc
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import models
from jlora.core import lora, optim
from jlora.interop import peft
from jlora.objectives import dpo
from jlora.run import build, config
from tests.helpers import CFG, randomize_b, tiny_model, tiny_model_dir

T = 14  # row width
PAIRS = [(5, 4, 3), (3, 6, 2), (7, 2, 5), (4, 3, 3)]  # (prompt, chosen, rejected) tokens


def _pairs(seed=0):
  """Hand-made pairs: token lists, and the batch of jlora.data.pairs' layout (chosen rows,
  then rejected rows; right-padded; the mask on the completion's targets)."""
  rng = np.random.default_rng(seed)
  seqs = []  # (tokens, completion length) per row, chosen rows then rejected rows
  prompts = [rng.integers(2, CFG.vocab_size, p) for p, _, _ in PAIRS]
  for side in (1, 2):
    for prompt, sizes in zip(prompts, PAIRS):
      seqs.append((np.concatenate([prompt, rng.integers(2, CFG.vocab_size, sizes[side])]),
                   sizes[side]))
  batch = {k: np.zeros((len(seqs), T), np.int32) for k in ("inputs", "targets", "mask")}
  for i, (tokens, n) in enumerate(seqs):
    L = len(tokens) - 1
    batch["inputs"][i, :L], batch["targets"][i, :L] = tokens[:-1], tokens[1:]
    batch["mask"][i, L - n:L] = 1
  return seqs, batch


def _row_logps(model, params, seqs):
  """Each row alone, unpadded: the summed log-probs of its completion's tokens."""
  out = []
  for tokens, n in seqs:
    logits, _ = model.apply({"params": params}, jnp.asarray(tokens)[None])
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    out.append(jnp.sum(jnp.take_along_axis(logp, jnp.asarray(tokens)[1:, None], -1)[-n:, 0]))
  return jnp.stack(out)


def _independent(kind, pol, ref, lengths, beta=0.3, gamma=0.2, lam=0.4):
  """The mean loss over pairs, from each paper's formula (not dpo.pair_losses)."""
  P = len(pol) // 2
  pc, pr, rc, rr = pol[:P], pol[P:], ref[:P], ref[P:]
  lc, lr = lengths[:P], lengths[P:]
  logratio = (pc - rc) - (pr - rr)
  if kind == "sigmoid":
    losses = jnp.log1p(jnp.exp(-beta * logratio))
  elif kind == "ipo":
    losses = (logratio - 1 / (2 * beta)) ** 2
  elif kind == "hinge":
    losses = jnp.maximum(0.0, 1 - beta * logratio)
  elif kind == "simpo":
    losses = jnp.log1p(jnp.exp(-(beta * (pc / lc - pr / lr) - gamma)))
  else:  # orpo: odds = p / (1 - p) with p the mean-token probability
    p_c, p_r = jnp.exp(pc / lc), jnp.exp(pr / lr)
    log_odds_ratio = jnp.log(p_c / (1 - p_c)) - jnp.log(p_r / (1 - p_r))
    losses = -pc / lc + lam * jnp.log1p(jnp.exp(-log_odds_ratio))
  return jnp.mean(losses)


def _policy(lora_init: bool):
  """(model, plan, trainable, frozen loss input, the reference's params, the starting
  adapter): the policy is the starting adapter moved a little; the start, a fresh adapter
  (B = 0) or a trained one (lora.init); the reference, the base (fresh LoRA) or the base
  with the starting adapter (lora.init)."""
  model, params = tiny_model()
  plan = lora.plan(params, models.lora_spec(CFG, rank=2, alpha=4.0))
  start = lora.init_adapters(params, plan, jax.random.PRNGKey(1))
  start = randomize_b(start, jax.random.PRNGKey(2), 0.3 if lora_init else 0.0)
  moved = randomize_b(start, jax.random.PRNGKey(3), 0.3)
  moved = jax.tree_util.tree_map(lambda a, b: a + b, start, moved)
  trainable, base = optim.trainable(params, moved, plan)
  ref = {"lora": start if lora_init else {}, "full": {}}
  ref_params = lora.with_adapters(params, start, plan) if lora_init else params
  return model, plan, trainable, {"base": base, "ref": ref}, ref_params, start


@pytest.mark.parametrize("lora_init", [False, True])
def test_each_loss_and_its_gradient_equal_an_independent_computation(lora_init):
  model, plan, trainable, frozen, ref_params, _ = _policy(lora_init)
  seqs, batch = _pairs()
  lengths = jnp.asarray([n for _, n in seqs], jnp.float32)
  ref = _row_logps(model, ref_params, seqs)  # a separate forward: no adapters, or the start
  # every kind from the base; from lora.init the one that changes is the reference's
  # log-probs, which every kind with a reference shares: sigmoid's checks it
  kinds = ["sigmoid"] if lora_init else list(dpo.LOSSES)

  def policy_logps(tr):
    return _row_logps(model, lora.with_adapters(optim.combine(tr["full"], frozen["base"]),
                                                tr["lora"], plan), seqs)

  # The independent gradient by the chain rule: d loss / d row log-probs (the formula's)
  # through the rows' Jacobian, computed once for every kind.
  pol, jac = jax.jit(lambda tr: (policy_logps(tr), jax.jacrev(policy_logps)(tr)))(trainable)

  @jax.jit
  def jlora_losses(tr, batch):
    out = {}
    for kind in kinds:
      loss = dpo.dpo_loss(model, plan, kind=kind, beta=0.3, gamma=0.2, orpo_lambda=0.4)
      mean = lambda tr, loss=loss: (lambda t, c, a: (t / c, (c, a)))(*loss(tr, frozen, batch))
      out[kind] = jax.value_and_grad(mean, has_aux=True)(tr)
    return out

  got = jlora_losses(trainable, batch)
  # A batch that brings the reference's log-probs (precomputed) gives the same loss.
  sigmoid = dpo.dpo_loss(model, plan, beta=0.3, chunk=8)  # chunked: the same loss
  cached = jax.jit(lambda tr, b: sigmoid(tr, frozen, b))(
      trainable, {**batch, "ref_logps": np.asarray(ref)})
  np.testing.assert_allclose(cached[0] / cached[1], got["sigmoid"][0][0], rtol=1e-6)
  P = len(PAIRS)
  for kind in kinds:
    (value, (count, aux)), grads = got[kind]
    want, d_rows = jax.value_and_grad(lambda p: _independent(kind, p, ref, lengths))(pol)
    want_grads = jax.tree_util.tree_map(lambda j: jnp.tensordot(d_rows, j, axes=1), jac)
    assert float(count) == P
    np.testing.assert_allclose(value, want, rtol=2e-5, atol=1e-6, err_msg=kind)
    assert float(jnp.abs(want)) > 1e-3  # a loss away from any trivial value
    for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * float(jnp.abs(w).max()),
                                 err_msg=kind)
    assert sum(float(jnp.abs(w).sum()) for w in jax.tree_util.tree_leaves(want_grads)) > 1e-4
    np.testing.assert_allclose(float(aux["logps/chosen"]), pol[:P].sum(), rtol=1e-5)
    if kind not in dpo.REFERENCE_FREE:  # TRL's rewards: beta x the log-ratio to the reference
      chosen, rejected = 0.3 * (pol[:P] - ref[:P]), 0.3 * (pol[P:] - ref[P:])
      np.testing.assert_allclose(float(aux["rewards/margins"]), (chosen - rejected).sum(),
                                 rtol=1e-4, atol=1e-5)
      assert float(aux["rewards/accuracies"]) == float((chosen > rejected).sum())


@pytest.mark.parametrize("lora_init", [False, True])
def test_at_the_start_the_sigmoid_loss_is_log_2_and_the_margins_0(lora_init):
  model, plan, _, frozen, _, start = _policy(lora_init)
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree_util.tree_leaves(start))
  _, batch = _pairs()
  total, count, aux = dpo.dpo_loss(model, plan, beta=0.1)({"lora": start, "full": {}},
                                                           frozen, batch)
  assert float(total / count) == np.float32(math.log(2))
  assert float(aux["rewards/margins"]) == 0.0 and float(aux["rewards/accuracies"]) == 0.0


def _live_bytes() -> int:
  # earlier tests' cyclic garbage holding arrays must go first, or a collection triggered
  # in between frees it and hides what was added (seen once in CI under xdist)
  gc.collect()
  return sum(x.nbytes for x in jax.live_arrays())


@pytest.mark.parametrize("how", ["fresh", "lora_init", "full"])
def test_the_reference_holds_no_copy_of_the_base(tmp_path, how):
  """Device memory an objective's reference adds, measured: none for fresh LoRA, the
  starting adapter's bytes for lora.init, a whole copy under full fine-tuning (the
  measurement sees a copy where there is one)."""
  model_dir = tiny_model_dir(str(tmp_path / "base"))
  values = {"run_dir": str(tmp_path / "run"), "model": {"path": model_dir},
            "lora": {"rank": 4}, "train": {"lr": 1e-3},
            "data": {"source": "task:arithmetic_pairs", "size": 16, "batch_size": 4,
                     "seq_len": 64},
            "eval": {"batches": 0, "examples": 0}, "dpo": {}}
  if how == "lora_init":
    _, params, model_cfg = models.load(model_dir)
    spec = models.lora_spec(model_cfg, 4)
    start = randomize_b(lora.init_adapters(params, spec, jax.random.PRNGKey(0)),
                        jax.random.PRNGKey(1))
    peft.save_peft(str(tmp_path / "start"), start, spec, model_cfg)
    values["lora"] = {"init": str(tmp_path / "start")}
  if how == "full":
    values["train"]["method"] = "full"
  cfg = config.from_dict(values, objective="dpo")
  s = build.build(cfg, build.preflight(cfg, dpo.DPO.rules), log=lambda _: None)
  base = sum(x.nbytes for x in jax.tree_util.tree_leaves((s.frozen, s.trainable["full"])))
  adapters = sum(x.nbytes for x in jax.tree_util.tree_leaves(s.trainable["lora"]))
  before = _live_bytes()
  objective = dpo.objective(s)
  added = _live_bytes() - before
  ref = objective.frozen["ref"]
  if how == "fresh":
    assert added < 0.01 * base and not jax.tree_util.tree_leaves(ref)
    assert objective.frozen["base"] is s.frozen  # the step's own frozen base
  elif how == "lora_init":
    assert adapters <= added < adapters + 0.01 * base
  else:
    assert added >= base
  objective.batches.close()


@pytest.mark.parametrize("key,value,message", [
    ("loss", "kto", "dpo.loss 'kto' is not one of sigmoid, ipo, hinge, simpo, orpo"),
    ("beta", 0.0, "dpo.beta must be > 0, got 0.0"),
    ("gamma", -1.0, "dpo.gamma must be >= 0, got -1.0"),
    ("orpo_lambda", float("nan"), "dpo.orpo_lambda must be >= 0, got nan"),
])
def test_bad_dpo_values_are_one_line_errors(key, value, message):
  with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
    dpo.DPOSection(**{key: value})
