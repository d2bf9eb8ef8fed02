"""jlora.interop.gguf_adapter: llama.cpp LoRA adapters read by the ``gguf`` package and
applied to the base in llama.cpp's own layout by an independent numpy forward (Llama:
SmolLM2's own GGUF, its permuted q/k and interleaved RoPE; Qwen3: NeoX RoPE, q/k norms),
F16 against the factors rounded to F16, read back into jlora, and the one-line refusals."""

import json
import os

import jax
import numpy as np
import pytest

from jlora import cli, models
from jlora.core import lora
from jlora.interop import adapters as adapters_lib, gguf_adapter
from tests.helpers import randomize_b, tiny_model_dir

gguf = pytest.importorskip("gguf")
TOKENS = np.array([[1, 17, 256, 3001, 45, 9, 812, 77]])

# HF -> llama.cpp tensor names, written here from llama.cpp's tensor map (not jlora's table)
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def _read(path):
  """name -> f32 numpy array in numpy order (rows = the last GGUF dimension)."""
  out = {}
  for t in gguf.GGUFReader(path).tensors:
    x = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64)
    out[t.name] = x.reshape([int(d) for d in reversed(t.shape)])
  return out


def _alpha(adapter_file):
  reader = gguf.GGUFReader(adapter_file)
  assert reader.fields["general.type"].contents() == "adapter"
  assert reader.fields["adapter.type"].contents() == "lora"
  return float(reader.fields["adapter.lora.alpha"].contents())


def _applied(base, adapter_file, factors=None):
  """The base's weights plus llama.cpp's LoRA: W + (alpha / r) B A, r each tensor's rank
  (alpha 0: scale 1), as ``llama-adapter.cpp`` computes it (``factors``: instead of the
  file's)."""
  alpha = _alpha(adapter_file)
  factors = _read(adapter_file) if factors is None else factors
  out = dict(base)
  for name in {n.rsplit(".", 1)[0] for n in factors}:
    a, b = factors[name + ".lora_a"], factors[name + ".lora_b"]
    scale = alpha / a.shape[0] if alpha else 1.0
    out[name] = base[name] + scale * b @ a
  return out


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta, interleaved):
  """x [T, heads, d]; llama.cpp's NORM RoPE rotates adjacent pairs (Llama, whose q/k rows
  the converter permuted), NEOX the two halves (Qwen3)."""
  d = x.shape[-1]
  freq = theta ** (-np.arange(0, d, 2) / d)
  ang = pos[:, None, None] * freq[None, None, :]
  cos, sin = np.cos(ang), np.sin(ang)
  if interleaved:
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return out
  x0, x1 = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)


def _forward(W, cfg, tokens, interleaved):
  """Logits of one sequence, float64, from llama.cpp-named weights."""
  x = W["token_embd.weight"][tokens]
  T, H, K, d = len(tokens), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  pos = np.arange(T, dtype=np.float64)
  causal = np.tril(np.ones((T, T), bool))
  for i in range(cfg.num_layers):
    w = lambda n: W[f"blk.{i}.{n}.weight"]  # noqa: E731
    h = _rms(x, w("attn_norm"), cfg.rms_norm_eps)
    q, k, v = ((h @ w(n).T).reshape(T, -1, d) for n in ("attn_q", "attn_k", "attn_v"))
    if cfg.qk_norm:
      q, k = _rms(q, w("attn_q_norm"), cfg.rms_norm_eps), _rms(k, w("attn_k_norm"),
                                                              cfg.rms_norm_eps)
    q, k = _rope(q, pos, cfg.rope_theta, interleaved), _rope(k, pos, cfg.rope_theta, interleaved)
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x = x + np.einsum("hqk,khd->qhd", p, v).reshape(T, -1) @ w("attn_output").T
    h = _rms(x, w("ffn_norm"), cfg.rms_norm_eps)
    g = h @ w("ffn_gate").T
    x = x + (g / (1 + np.exp(-g)) * (h @ w("ffn_up").T)) @ w("ffn_down").T
  x = _rms(x, W["output_norm.weight"], cfg.rms_norm_eps)
  return x @ W.get("output.weight", W["token_embd.weight"]).T


def _adapters(params, cfg):
  """Random adapters with non-zero B: rank 2 (alpha 32) on attention, rank 4 with alpha
  16 on the MLP, so modules differ in scale (8 vs 4: folded into B for one file alpha)."""
  spec = models.lora_spec(cfg, 2, alpha=32.0, targets=(
      lora.Rule(r".*attn/.*_proj/kernel", rank=2, alpha=32.0),
      lora.Rule(r".*mlp/.*_proj/kernel", rank=4, alpha=16.0)))
  plan = lora.plan(params, spec)
  adapters = randomize_b(lora.init_adapters(params, plan, jax.random.PRNGKey(3)),
                         jax.random.PRNGKey(4), 0.05)
  return spec, plan, adapters


def _jlora(model, params, adapters, spec):
  return np.asarray(model.apply({"params": lora.with_adapters(params, adapters, spec)},
                                TOKENS)[0][0], np.float64)


def test_a_llama_adapter_applied_as_llama_cpp_does_gives_jloras_logits(tmp_path):
  """SmolLM2 (Llama, Q4_1): llama.cpp's base tensors as the file holds them (q/k rows
  permuted), the adapter applied to them, interleaved RoPE: jlora's logits within 1e-4
  (F32), and within F16 rounding of the factors (F16)."""
  path = models.smollm2_gguf()
  model, params, cfg = models.load(path)
  spec, plan, adapters = _adapters(params, cfg)
  want = _jlora(model, params, adapters, spec)
  base = _read(path)
  f32 = gguf_adapter.save(str(tmp_path / "a.gguf"), adapters, spec, cfg)
  got = _forward(_applied(base, f32), cfg, TOKENS[0], interleaved=True)
  assert np.abs(_forward(base, cfg, TOKENS[0], True) - want).max() > 0.05  # it changes them
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  # F16: the F32 file's factors rounded to F16
  f16 = gguf_adapter.save(str(tmp_path / "h.gguf"), adapters, spec, cfg, dtype="f16")
  assert gguf.GGUFReader(f16).tensors[0].tensor_type == gguf.GGMLQuantizationType.F16
  assert _alpha(f16) == _alpha(f32) == 16.0  # the MLP's (first) 16 / 4 x 4; attention folded
  rounded = {k: v.astype(np.float16).astype(np.float64) for k, v in _read(f32).items()}
  np.testing.assert_allclose(_forward(_applied(base, f16), cfg, TOKENS[0], True),
                             _forward(_applied(base, f32, rounded), cfg, TOKENS[0], True),
                             rtol=0, atol=1e-9)
  # read back (``lora.init`` / ``import-peft`` of the .gguf): jlora's forward again
  back, back_spec, _ = adapters_lib.load(f32, params, cfg)
  np.testing.assert_allclose(_jlora(model, params, back, back_spec), want, rtol=0, atol=1e-4)


def test_a_qwen3_adapter_is_neither_permuted_nor_renamed_wrongly(tmp_path):
  """A tiny Qwen3: its HF weights renamed to llama.cpp's (no permutation: NeoX RoPE), the
  adapter applied to them, q/k norms: jlora's logits."""
  from safetensors.numpy import load_file
  model_dir = tiny_model_dir(str(tmp_path / "base"), "qwen3")
  model, params, cfg = models.load(model_dir)
  spec, plan, adapters = _adapters(params, cfg)
  want = _jlora(model, params, adapters, spec)
  hf = load_file(os.path.join(model_dir, "model.safetensors"))
  base = {}
  for name, x in hf.items():
    if name.startswith("model.layers."):
      _, _, i, *module, kind = name.split(".")
      base[f"blk.{i}.{_NAMES['.'.join(module)]}.{kind}"] = x.astype(np.float64)
    else:
      base[{"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
            "output_norm.weight", "lm_head.weight": "output.weight"}[name]] = \
          x.astype(np.float64)
  file = gguf_adapter.save(str(tmp_path / "q.gguf"), adapters, spec, cfg)
  assert gguf.GGUFReader(file).fields["general.architecture"].contents() == "qwen3"
  np.testing.assert_allclose(_forward(_applied(base, file), cfg, TOKENS[0] % cfg.vocab_size,
                                      interleaved=False),
                             np.asarray(model.apply(
                                 {"params": lora.with_adapters(params, adapters, spec)},
                                 TOKENS % cfg.vocab_size)[0][0]), rtol=0, atol=1e-4)
  assert want.shape[-1] == cfg.vocab_size


def test_export_gguf_through_the_cli_and_its_refusals(trained_run, tmp_path, capsys):
  """``jlora export RUN --format gguf``: a file the gguf package reads, with every adapted
  weight's two factors; an existing --out, a MoE model, fully trained weights: one line,
  exit 2, nothing written."""
  run = trained_run[0]
  out = tmp_path / "run.gguf"
  assert cli.main(["export", run, "--format", "gguf", "--out", str(out)]) == 0
  assert "llama.cpp LoRA adapter" in capsys.readouterr().out
  names = [t.name for t in gguf.GGUFReader(str(out)).tensors]
  adapted = json.load(open(os.path.join(run, "config.json")))
  assert adapted["lora"]["rank"] == 4
  assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)
  assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
  before = os.listdir(tmp_path)
  assert cli.main(["export", run, "--format", "gguf", "--out", str(out)]) == 2
  assert capsys.readouterr().err == f"jlora: error: --out {out} already exists\n"
  assert os.listdir(tmp_path) == before
  moe = models.ModelConfig("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                           num_experts=4, experts_per_token=2, moe_intermediate_size=8)
  with pytest.raises(ValueError, match=r"^--format gguf: llama.cpp adapters are written for "
                     r"llama, qwen3 models, not qwen3_moe$"):
    gguf_adapter.tensors({}, None, moe)
