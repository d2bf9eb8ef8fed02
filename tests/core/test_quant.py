"""jlora.core.quant: QLoRA's quantised frozen base. Each format against an independent numpy
quantiser and its error bound, gradients through quantised layers against their
dequantised twins, the embedding format, a sharded quantised load, bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import cli, models
from jlora.core import lora, matmul, optim, quant
from jlora.infra import mesh as mesh_lib
from tests.helpers import max_abs_diff, randomize_b, recipe, write_toml

# The 16 NormalFloat levels as printed in the QLoRA paper (Dettmers et al. 2023, App. E).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def _nf4_numpy(x, axis):
  """NF4 round trip in numpy: blocks of 64 along ``axis``, absmax scale, nearest level."""
  x = np.moveaxis(x, axis, -1)
  blocks = x.reshape(*x.shape[:-1], -1, 64)
  absmax = np.abs(blocks).max(-1, keepdims=True)
  levels = NF4[np.abs(blocks[..., None] / absmax[..., None] - NF4).argmin(-1)]
  return np.moveaxis((levels * absmax).reshape(x.shape), -1, axis)


@pytest.mark.parametrize("shape,axis", [((256, 96), -2), ((3, 128, 40), -2), ((50, 192), -1)])
def test_each_format_matches_an_independent_quantiser_and_its_error_bound(shape, axis):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.05
  x[..., 0, :] *= 20  # an outlier row: the scales must be per channel / per block
  nf4 = quant.quantize(x, "nf4", axis, jnp.float32)
  got = np.asarray(nf4.dequantize())
  np.testing.assert_allclose(got, _nf4_numpy(x, axis), rtol=1e-6, atol=1e-7)
  assert nf4.codes.dtype == np.uint8 and nf4.shape == shape
  assert nf4.nbytes == x.size // 2 + x.size // 64 * 4  # two codes per byte + f32 scales
  half_gap = np.diff(NF4).max() / 2
  block_max = np.abs(np.moveaxis(x, axis, -1).reshape(*np.moveaxis(x, axis, -1).shape[:-1],
                                                       -1, 64)).max(-1)
  err = np.abs(np.moveaxis(got - x, axis, -1).reshape(*block_max.shape, 64)).max(-1)
  assert (err <= half_gap * block_max * (1 + 1e-5)).all()
  int8 = quant.quantize(x, "int8", axis, jnp.float32)
  got8 = np.asarray(int8.dequantize())
  step = np.abs(x).max(axis=axis, keepdims=True) / 127  # per output channel
  assert (np.abs(got8 - x) <= step / 2 * (1 + 1e-5)).all()
  assert int8.codes.dtype == np.int8 and int8.nbytes == x.size + step.size * 4
  assert np.abs(got8 - x).max() < np.abs(got - x).max()  # int8 is the finer format
  # A QTensor sliced on a stacked axis (nn.scan over layers) is the slice's quantisation.
  if len(shape) == 3:
    np.testing.assert_array_equal(np.asarray(jax.tree.map(lambda a: a[1], nf4).dequantize()),
                                  got[1])


def test_a_quantised_projection_is_exact_under_either_lora_impl():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((6, 128)), jnp.float32)
  w = quant.quantize(rng.standard_normal((128, 32)).astype(np.float32), "nf4", -2, jnp.float32)
  w = jax.tree.map(jnp.asarray, w)
  a = jnp.asarray(rng.standard_normal((128, 4)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
  want = x @ w.dequantize() + 0.5 * (x @ a) @ b  # independent: the dense twin by hand
  for impl in ("xla", "interpret"):  # "interpret" selects the Pallas kernel on CPU
    np.testing.assert_allclose(matmul.lora_dense(x, w, a, b, 0.5, impl=impl), want, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("kind,fmt", [("llama_tied", "nf4"), ("qwen3_moe", "nf4"),
                                      ("qwen3_moe", "int8")])
def test_adapter_gradients_through_quantised_layers_equal_the_dequantised_twin(quant_models, kind, fmt):
  model, qparams, cfg = models.load(quant_models[kind], quantize=fmt)
  flat = lora.flatten(qparams)
  quantised = {p for p, x in flat.items() if quant.is_quantized(x)}
  assert "embed/embedding" in quantised and "layers/attn/q_proj/kernel" in quantised
  assert not any("norm" in p or "router" in p for p in quantised)
  table = flat["embed/embedding"]  # under nf4 the table is int8 unless asked otherwise
  assert table.format == ("int8" if fmt == "nf4" else fmt)
  twin = quant.dequantize_tree(qparams)
  plan = lora.plan(qparams, models.lora_spec(cfg, rank=4))
  assert plan.targets and len(plan.targets) == len(lora.plan(twin, plan.spec).targets)
  adapters = randomize_b(lora.init_adapters(qparams, plan, jax.random.PRNGKey(0)),
                         jax.random.PRNGKey(1))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg.vocab_size)
  weights = jax.random.normal(jax.random.PRNGKey(3), (2, 12, cfg.vocab_size))

  def loss(ad, base):
    logits = model.apply({"params": optim.model_params({"lora": ad, "full": {}}, base, plan)},
                         tokens)[0]
    return jnp.sum(logits * weights)

  (lq, gq), (ld, gd) = (jax.jit(jax.value_and_grad(loss))(adapters, p) for p in (qparams, twin))
  assert abs(float(lq) - float(ld)) <= 1e-5 * abs(float(ld))
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(gd))
  assert max_abs_diff(gq, gd) <= 1e-5 * scale
  # The quantised base is a different model from the f32 one, by about the format's error.
  _, dense, _ = models.load(quant_models[kind])
  assert 0 < max_abs_diff(model.apply({"params": qparams}, tokens)[0],
                          model.apply({"params": dense}, tokens)[0])


def test_the_embedding_format_is_chosen_apart(quant_models):
  for embeddings, want in (("nf4", "nf4"), ("none", None), ("int8", "int8")):
    _, params, _ = models.load(quant_models["llama_tied"], quantize="nf4",
                               quantize_embeddings=embeddings)
    flat = lora.flatten(params)
    table = flat["embed/embedding"]
    assert (table.format if quant.is_quantized(table) else None) == want
    assert flat["layers/mlp/up_proj/kernel"].format == "nf4"
  _, params, _ = models.load(quant_models["llama_tied"], quantize_embeddings="nf4")  # base unquantised
  assert not any(quant.is_quantized(x) for x in lora.flatten(params).values())


def test_sharded_quantised_load_equals_the_unsharded_one(quant_models):
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=4, tensor=2))
  model, sharded, cfg = models.load(quant_models["llama_tied"], quantize="nf4", mesh=mesh)
  _, single, _ = models.load(quant_models["llama_tied"], quantize="nf4")
  q = lora.flatten(sharded)["layers/mlp/gate_proj/kernel"]  # [layers, embed, mlp]
  assert q.codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert q.scale.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
  assert len({s.data.shape for s in q.codes.addressable_shards}) == 1
  assert q.codes.addressable_shards[0].data.shape == (cfg.num_layers, 64 // 2 // 4, 128 // 2)
  assert max_abs_diff(sharded, single) == 0
  tokens = jnp.arange(24).reshape(2, 12)
  np.testing.assert_allclose(model.apply({"params": sharded}, tokens)[0],
                             model.apply({"params": single}, tokens)[0], atol=1e-5)


@pytest.mark.parametrize("override,message", [
    ("model.quantize='int4'", "model.quantize 'int4' is not one of none, int8, nf4"),
    ("model.quantize_embeddings='fp8'",
     "model.quantize_embeddings 'fp8' is not one of auto, none, int8, nf4"),
    ("train.method='full'", "model.quantize='nf4' freezes a quantised base: it needs "
                            "train.method = 'lora'"),
    ("lora.full=['embed']", "lora.full trains 'embed/embedding' in full, but "
                            "model.quantize='nf4' stores it quantised"),
    ("model.quantize='int8'", "model.double_quant quantises nf4's block scales: it needs "
                              "model.quantize = 'nf4'"),
])
def test_bad_quantize_configs_are_one_line(quant_models, tmp_path, capsys, override, message):
  values = recipe(quant_models["llama_tied"], tmp_path / "run")
  values["model"]["quantize"] = "nf4"
  values["model"]["double_quant"] = "double_quant" in message
  assert cli.main(["train", write_toml(tmp_path / "r.toml", values), "--set", override]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("shape,axis", [((3, 128, 40), -2), ((512, 128), -1)])
def test_double_quantised_scales_match_an_independent_computation(shape, axis):
  """QLoRA's double quantisation by hand in numpy: nf4 codes chosen with the f32 scales,
  the scales centred on their per-layer mean, int8 absmax (qwix's calibration: absmax maps
  to 127.5, codes rounded and clipped to int8) over blocks along the scales' last axis (a kernel's 40
  outputs: one block; an embedding row's 2 blocks of 64), dequantised with the rounded
  scales."""
  x = np.random.default_rng(2).standard_normal(shape).astype(np.float32) * 0.05
  x[..., 3, :] *= 30  # a few large blocks: a wide range of scales
  q = quant.quantize(x, "nf4", axis, jnp.float32, double=True)
  xm = np.moveaxis(x, axis, -1)
  blocks = xm.reshape(*xm.shape[:-1], -1, 64)
  s = np.abs(blocks).max(-1)  # [..., channels, K / 64]
  idx = np.abs(blocks[..., None] / s[..., None, None] - NF4).argmin(-1)
  s = np.moveaxis(s, -1, axis)  # the kernel's layout: [..., K / 64, N] or [V, D / 64]
  off = s.mean(axis=(-2, -1), keepdims=True)
  chan = -1  # the scales' last axis: a kernel's outputs (40), an embedding row's blocks (2)
  g = 40 if axis == -2 else 2
  c = np.moveaxis(s - off, chan, -1)
  cb = c.reshape(*c.shape[:-1], -1, g)
  step = np.abs(cb).max(-1, keepdims=True) / 127.5  # qwix's int8: absmax -> 127.5,
  codes = np.clip(np.round(cb / step), -128, 127)  # rounded half to even, clipped
  # A centred scale on a rounding tie (e.g. every block's largest, at 127.5) may round
  # either way in f32: there the codes may differ by one; elsewhere they are equal.
  r = cb / step
  tie = np.abs(np.abs(r - np.floor(r)) - 0.5) < 1e-3
  got_codes = np.moveaxis(np.asarray(q.scale), chan, -1).reshape(cb.shape)
  assert np.array_equal(got_codes[~tie], codes[~tie])
  assert np.abs(got_codes - codes)[tie].max(initial=0) <= 1
  codes = np.where(tie, got_codes, codes)
  s2 = np.moveaxis((codes * step).reshape(c.shape), -1, chan) + off
  want = NF4[idx] * np.moveaxis(s2, axis, -1)[..., None]
  want = np.moveaxis(want.reshape(xm.shape), -1, axis)
  got = np.asarray(jax.tree.map(jnp.asarray, q).dequantize())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert q.scale.dtype == np.int8 and q.scale_offset.shape[-2:] == (1, 1)
  plain = quant.quantize(x, "nf4", axis, jnp.float32)
  saved_bits = (plain.nbytes - q.nbytes) * 8 / x.size
  assert saved_bits == pytest.approx((4 - 1 - 4 / g) * 8 / 64, abs=0.01)
  # On weights without outlier rows the error it adds is small against nf4's own (with the
  # 30x rows above, a block's int8 step is set by the outlier's scales: +11% here).
  y = np.random.default_rng(3).standard_normal(shape).astype(np.float32) * 0.05
  errors = [np.abs(np.asarray(quant.quantize(y, "nf4", axis, jnp.float32, double=d
                                             ).dequantize()) - y).mean() for d in (False, True)]
  assert errors[1] < 1.01 * errors[0], errors


def test_double_quant_through_a_run_trains_the_dequantised_twin(quant_models):
  model, qparams, cfg = models.load(quant_models["llama_tied"], quantize="nf4",
                                    quantize_embeddings="nf4", double_quant=True)
  flat = lora.flatten(qparams)
  assert all(x.scale_scale is not None for x in flat.values() if quant.is_quantized(x))
  tokens = jnp.arange(24).reshape(2, 12)
  np.testing.assert_allclose(model.apply({"params": qparams}, tokens)[0],
                             model.apply({"params": quant.dequantize_tree(qparams)}, tokens)[0],
                             atol=1e-5)
