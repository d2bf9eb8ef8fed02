"""jlora.core.stack: N adapters with different ranks, alphas and targets stacked over one
base. Each adapter's slice starts as its solo adapter; a model run with the stack gives
each row its own adapter's logits and gradients (against N solo models); padded and
untargeted slices get exactly zero gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import models
from jlora.core import lora, matmul, optim, stack
from jlora.infra import mesh as mesh_lib
from jlora.objectives import lm
from jlora.run import train_step
from tests.helpers import CFG, randomize_b, stack_case, tiny_model

SPECS = [models.lora_spec(CFG, rank=2),  # all kernels
         models.lora_spec(CFG, rank=4, alpha=16.0, targets="attn"),
         models.lora_spec(CFG, rank=1, alpha=8.0, targets="mlp", rslora=True)]


@pytest.fixture(scope="module")
def base():
  model, params = tiny_model()
  st = stack.stack(params, SPECS)
  solos = [randomize_b(lora.init_adapters(params, p, jax.random.PRNGKey(10 + i)),
                       jax.random.PRNGKey(20 + i), 0.3) for i, p in enumerate(st.plans)]
  return model, params, st, solos


def test_init_holds_each_solo_adapter_and_unstacks_to_it(base):
  _, params, st, _ = base
  keys = [jax.random.PRNGKey(i) for i in range(3)]
  stacked = stack.init_adapters(params, st, keys)
  for i, (p, k) in enumerate(zip(st.plans, keys)):
    solo = lora.adapter_leaves(lora.init_adapters(params, p, k))
    got = lora.adapter_leaves(stack.unstack(stacked, st, i))
    assert got.keys() == solo.keys()
    for path in solo:
      for name in ("a", "b"):
        np.testing.assert_array_equal(got[path][name], solo[path][name])
  q = "layers/attn/q_proj/kernel"  # [layers, in, out]: A [layers, N, in, r_max]
  a = lora.adapter_leaves(stacked)[q]["a"]
  assert a.shape == (CFG.num_layers, 3, CFG.hidden_size, 4)
  assert not np.any(a[:, 0, :, 2:]) and not np.any(a[:, 2])  # rank 2 padded; mlp-only
  up = lora.adapter_leaves(stacked)["layers/mlp/up_proj/kernel"]["a"]
  assert not np.any(up[:, 1])  # attention-only adapter: zeros on MLP kernels


def _logits(model, params, tokens):
  return model.apply({"params": params}, tokens)[0]


def test_each_row_runs_its_own_adapter(base):
  model, params, st, solos = base
  stacked = stack.stack_adapters(solos, st)
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (6, 10))
  with matmul.adapter_rows((2, 2, 2)):  # rows grouped by adapter
    got = _logits(model, stack.with_adapters(params, stacked, st), tokens)
  for i, (p, solo) in enumerate(zip(st.plans, solos)):
    want = _logits(model, lora.with_adapters(params, solo, p), tokens[2 * i:2 * i + 2])
    np.testing.assert_allclose(got[2 * i:2 * i + 2], want, rtol=1e-5, atol=1e-5)
  plain = _logits(model, params, tokens[:2])
  assert np.max(np.abs(got[:2] - plain)) > 1e-3  # the adapters change the logits


def test_gradients_per_adapter_equal_solo_and_padding_gets_none(base):
  model, params, st, solos = base
  stacked = stack.stack_adapters(solos, st)
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (6, 10))

  def stacked_loss(adapters):
    with matmul.adapter_rows((2, 2, 2)):
      logits = _logits(model, stack.with_adapters(params, adapters, st), tokens)
    return jnp.sum(logits ** 2) * 1e-3

  grads = jax.grad(stacked_loss)(stacked)
  for i, (p, solo) in enumerate(zip(st.plans, solos)):
    def solo_loss(adapters):
      rows = tokens[2 * i:2 * i + 2]
      return jnp.sum(_logits(model, lora.with_adapters(params, adapters, p), rows) ** 2) * 1e-3
    want = lora.adapter_leaves(jax.grad(solo_loss)(solo))
    got = lora.adapter_leaves(stack.unstack(grads, st, i))
    for path in want:
      for name in ("a", "b"):
        np.testing.assert_allclose(got[path][name], want[path][name], rtol=1e-4, atol=1e-6)
  g = lora.adapter_leaves(grads)
  q, up = g["layers/attn/q_proj/kernel"], g["layers/mlp/up_proj/kernel"]
  assert not np.any(q["a"][:, 0, :, 2:]) and not np.any(q["b"][:, 0, 2:])  # past rank 2
  assert not np.any(q["a"][:, 2]) and not np.any(q["b"][:, 2])  # mlp-only adapter
  assert not np.any(up["a"][:, 1]) and not np.any(up["b"][:, 1])  # attention-only adapter


def test_stack_errors_are_one_line(base):
  model, params, st, solos = base
  with pytest.raises(ValueError, match="cannot be stacked"):
    stack.stack(params, [lora.LoraSpec(rank=2, full=("embed",)).with_layouts(
        dict(models.layouts(CFG)))])
  with pytest.raises(ValueError, match="need each adapter's rows"):
    _logits(model, stack.with_adapters(params, stack.stack_adapters(solos, st), st),
            np.zeros((2, 4), np.int32))


def _solo_tx(kw):
  return optim.optimizer(**kw)


def _group_tx(st, settings):
  return stack.optimizer(st, [kw["learning_rate"] for kw in settings],
                         b_lr_ratios=[kw.get("b_lr_ratio", 1.0) for kw in settings],
                         weight_decays=[kw.get("weight_decay", 0.0) for kw in settings],
                         max_grad_norms=[kw["max_grad_norm"] for kw in settings])


def _assert_same_state(got, want, what):
  """Adapters within Adam's float noise (lr x f32 rounding), moments and counts close."""
  for (pg, g), (pw, w) in zip(jax.tree_util.tree_leaves_with_path(got),
                              jax.tree_util.tree_leaves_with_path(want)):
    assert pg == pw, (what, pg, pw)
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                               rtol=1e-3, atol=3e-4, err_msg=f"{what} {pg}")


def test_a_runs_state_moves_between_its_group_and_a_solo_run():
  """Two steps in a group then two alone (from ``solo_state``) equal four alone; two alone
  then two in a group (from ``stacked_state``) too: a run of a group checkpoints and
  resumes as a solo run, and a group resumes from each run's own checkpoint."""
  model, params, st, solos, settings, batches = stack_case()
  one = mesh_lib.make_mesh(mesh_lib.MeshConfig(), jax.devices()[:1])
  group = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  copy = lambda t: jax.tree.map(jnp.copy, t)  # states are donated

  built = {}  # each adapter's solo step, compiled once

  def solo_step(i):
    """(adapter i's solo step, a fresh state, its frozen base)."""
    trainable, frozen = optim.trainable(params, copy(solos[i]), st.plans[i])
    if i not in built:
      built[i] = train_step.build(lm.lm_loss(model, st.plans[i]), _solo_tx(settings[i]),
                                  trainable, frozen, one)[0]
      trainable, frozen = optim.trainable(params, copy(solos[i]), st.plans[i])
    return built[i], train_step.init_state(trainable, _solo_tx(settings[i]), one), frozen

  def run_solo(i, state, n):
    step, _, frozen = solo_step(i)
    for _ in range(n):
      state, _ = step(state, frozen, mesh_lib.global_batch(batches[i], one))
    return state

  group_step, group_state = train_step.build(
      lm.stacked_lm_loss(model, st, (8, 8, 8)), _group_tx(st, settings),
      {"lora": stack.stack_adapters([copy(s) for s in solos], st), "full": {}}, params, one,
      adapter_axes=stack.adapter_axes(st))

  def run_group(state, n):
    for _ in range(n):
      state, _ = group_step(state, params, mesh_lib.global_batch(group, one))
    return state

  straight = [run_solo(i, solo_step(i)[1], 4) for i in range(3)]
  half = run_group(group_state, 2)
  for i in range(3):
    init = _solo_tx(settings[i]).init({"lora": solos[i], "full": {}})
    resumed = run_solo(i, stack.solo_state(jax.tree.map(jnp.copy, half), st, i, init), 2)
    _assert_same_state(resumed, straight[i], f"group then solo, adapter {i}")
  halves = [run_solo(i, solo_step(i)[1], 2) for i in range(3)]
  regrouped = run_group(stack.stacked_state(halves, st), 2)
  for i in range(3):
    init = _solo_tx(settings[i]).init({"lora": solos[i], "full": {}})
    _assert_same_state(stack.solo_state(regrouped, st, i, init), straight[i],
                       f"solo then group, adapter {i}")
