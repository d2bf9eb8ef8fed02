"""jlora.models.gguf_loader with ``model.quantize = "gguf"``: a tiny GGUF in every block kind
(two stacks mixing kinds per layer, Llama's permuted q/k rows among them) loads as the file's
own blocks, computes the logits of the f32 model the ``gguf`` package dequantises, takes the
file's bytes, shards like the kernels; what it cannot keep is refused in one line."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jlora import cli, models
from jlora.core import ggml, lora, quant
from jlora.infra import mesh as mesh_lib
from jlora.models import gguf_loader
from tests.helpers import TINY_GGUF_KINDS, recipe, tiny_gguf, write_toml


def test_the_files_own_blocks_compute_the_dequantised_model(gguf_model):
  model, blocks, cfg = models.load(gguf_model, quantize="gguf")
  _, dense, _ = models.load(gguf_model)  # f32, dequantised by the gguf package
  flat = lora.flatten(blocks)
  assert flat["layers/attn/v_proj/kernel"].format == "gguf:q4_k+q6_k"
  assert flat["layers/mlp/down_proj/kernel"].format == "gguf:q4_0+q8_0"
  assert flat["embed/embedding"].format == "gguf:q8_0"
  assert {f.format for f in flat.values() if quant.is_quantized(f)} >= {
      "gguf:" + k.lower() for ks in TINY_GGUF_KINDS.values() for k in ks if len(ks) == 1}
  tokens = jnp.arange(48).reshape(2, 24) * 13 % cfg.vocab_size
  want = np.asarray(model.apply({"params": dense}, tokens)[0])
  got = np.asarray(model.apply({"params": blocks}, tokens)[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # Stored bytes: the file's tensors, plus the narrower kind's padding in a mixed stack and
  # its kinds index (int32 per layer).
  reader = gguf_loader.open_reader(gguf_model)
  padding = sum(int(t.n_bytes) // ggml.KINDS["q4_k"][1] * (210 - 144) for t in reader.tensors
                if t.tensor_type.name == "Q4_K" and "attn_v" in t.name)
  padding += sum(int(t.n_bytes) // 18 * (34 - 18) for t in reader.tensors
                 if t.tensor_type.name == "Q4_0" and "ffn_down" in t.name)
  padding += 2 * cfg.num_layers * 4
  assert quant.stored_bytes(blocks) == sum(int(t.n_bytes) for t in reader.tensors) + padding
  # Sharded like the kernels: the same logits.
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=4, tensor=2))
  _, sharded, _ = models.load(gguf_model, quantize="gguf", mesh=mesh)
  q = lora.flatten(sharded)["layers/mlp/gate_proj/kernel"]  # [layers, embed / 32, mlp, bytes]
  assert q.codes.sharding.spec == P(None, "fsdp", "tensor", None)
  np.testing.assert_allclose(np.asarray(model.apply({"params": sharded}, tokens)[0]), got,
                             atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("case,message", [
    ("q2k", "tiny.gguf: tensor blk.0.attn_q.weight is Q2_K, which model.quantize='gguf' "
            "cannot keep; supported: Q4_0"),
    ("hf", "model.quantize='gguf' keeps a GGUF file's own blocks, but "),
    ("embeddings", "model.quantize_embeddings 'gguf' keeps the file's own blocks: it needs "
                   "model.quantize = 'gguf'"),
])
def test_what_gguf_mode_cannot_keep_is_one_line_and_creates_nothing(
    gguf_model, model_dir, tmp_path, capsys, case, message):
  path = {"q2k": lambda: tiny_gguf(tmp_path / "tiny.gguf",
                                   kinds={**TINY_GGUF_KINDS, "attn_q": ["Q2_K"]}),
          "hf": lambda: model_dir, "embeddings": lambda: gguf_model}[case]()
  values = recipe(path, tmp_path / "run")
  values["model"]["quantize"] = "nf4" if case == "embeddings" else "gguf"
  if case == "embeddings":
    values["model"]["quantize_embeddings"] = "gguf"
  assert cli.main(["train", write_toml(tmp_path / "r.toml", values), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err
  assert not (tmp_path / "run").exists()
