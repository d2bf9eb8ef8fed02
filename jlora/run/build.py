"""What a run builds from its config before the first step, in two stages that write
nothing: ``preflight`` (everything knowable from the config, the model's config file, the
devices and a sample of the data: cheap; a mistake is a ValueError naming it) and ``build``
(weights, tokenizer, the LoRA plan, shardings, optimizer) into a ``Setup``, which every
objective (SFT, RL, the studies' arms) starts from. What an objective decides here (its
batch rows, its data checks, its LR factor) it passes in as ``Rules``, so nothing here
knows one objective from another. Where the two stages sit in a run: docs/ARCHITECTURE.md,
"A run, and where an objective plugs in".
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import optax

from jlora import data, kernels, models
from jlora.core import lora, optim, quant, sharding
from jlora.findings import hparams
from jlora.infra import mesh as mesh_lib
from jlora.interop import adapters as adapters_lib
from jlora.run import config as config_lib, events


def _batch_rows(cfg: config_lib.RunConfig) -> tuple[int, str]:
  return cfg.data.batch_size, f"data.batch_size={cfg.data.batch_size}"


def _check_batches(cfg: config_lib.RunConfig, tok: data.Tokenizer, model_cfg,
                   limit: int) -> data.Stats:
  """The data pipeline's checks: packed rows hold tokens to train on; an eval source
  opens. Returns the data's statistics (what the advisor reads)."""
  from jlora.run import evaluate
  d = cfg.data
  stats = data.stats(d, tok, limit=limit)
  if stats.trainable_tokens == 0:
    raise ValueError(
        f"data.source {d.source!r} has no trainable tokens: {stats.examples} examples, "
        f"{stats.tokens} tokens, 0 with loss ({stats.truncated} truncated at data.seq_len="
        f"{d.seq_len}, {stats.dropped} dropped): raise data.seq_len, or check the fields")
  eval_cfg = evaluate.eval_data_config(cfg)
  if eval_cfg is not None and cfg.eval.batches:
    data.open_source(eval_cfg)  # a missing or unreadable eval.source fails here
  return stats


@dataclasses.dataclass(frozen=True)
class Rules:
  """What an objective decides before anything is loaded (``jlora.objectives`` declare
  theirs; the defaults are the data pipeline's, as supervised fine-tuning uses it).

  Attributes:
    rows: cfg -> (rows of a step's batch, the setting that makes them), checked against
      the mesh's batch shards and ``train.grad_accum``.
    check_data: (cfg, tokenizer, model config, limit) -> the data's statistics (what the
      advisor reads); raises ValueError naming what is wrong with the data.
    lr_factor: the objective's factor on the LR rule (with no ``train.lr``).
  """
  rows: Callable[[config_lib.RunConfig], tuple[int, str]] = _batch_rows
  check_data: Callable[..., Any] = _check_batches
  lr_factor: float = 1.0


@dataclasses.dataclass
class Preflight:
  """What the cheap checks learned: the model's config and the data's statistics."""
  model_path: str
  model_cfg: Any
  stats: Any  # what the objective's ``Rules.check_data`` returned (None: not checked)
  lr_factor: float = 1.0  # the objective's factor on the LR rule


@dataclasses.dataclass
class Setup:
  """Everything a run builds from its config before the first step."""
  cfg: config_lib.RunConfig
  model: Any
  model_cfg: Any
  tok: data.Tokenizer
  plan: lora.Plan  # the spec resolved against this model, once: what will be trained
  mesh: Any
  frozen: Any
  trainable: Any
  lr: float
  lr_schedule: Any  # a float or an optax schedule: what tx uses, for logging
  tx: optax.GradientTransformation

  @property
  def spec(self) -> lora.LoraSpec:
    return self.plan.spec


def preflight(cfg: config_lib.RunConfig, rules: Rules = Rules(), stats_limit: int = 2000
              ) -> Preflight:
  """The checks that need no weights, with the objective's ``rules``; raises ValueError
  naming what is wrong."""
  kernels.selects_pallas(cfg.model.lora_impl)  # e.g. "pallas" on a CPU host
  if cfg.model.quantize != "none" and cfg.train.method != "lora":
    raise ValueError(f"model.quantize={cfg.model.quantize!r} freezes a quantised base: "
                     "it needs train.method = 'lora'")
  mesh_shape = cfg.mesh.shape(jax.device_count())
  shards = mesh_shape[0] * mesh_shape[1]
  rows, what = rules.rows(cfg)
  if rows % shards:
    raise ValueError(f"{what} is not divisible by the mesh's data x fsdp = {shards} shards "
                     "(set mesh.data, or the batch size)")
  if rows % cfg.train.grad_accum:
    raise ValueError(f"{what} is not divisible by train.grad_accum={cfg.train.grad_accum}")
  path = config_lib.model_path(cfg)
  model_cfg = models.read_config(path)
  models.check_quantize(path, cfg.model.quantize, cfg.model.quantize_embeddings)
  if cfg.data.seq_len > model_cfg.max_position_embeddings:
    raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's maximum positions "
                     f"({model_cfg.max_position_embeddings})")
  _learning_rate(cfg, model_cfg, rules.lr_factor)  # no LR fit and no train.lr: say so now
  if cfg.lora.init is not None and cfg.train.method == "lora":
    adapters_lib.check(cfg.lora.init)
  tok = data.Tokenizer.from_model(path)
  stats = rules.check_data(cfg, tok, model_cfg, stats_limit)
  return Preflight(path, model_cfg, stats, rules.lr_factor)


def reading(cfg: config_lib.RunConfig) -> Preflight:
  """The preflight of a trained run read back (generate, export, merge): the model's
  config only. Neither the training data nor the objective's plug-ins (an RL reward's
  module) are needed to read adapters."""
  path = config_lib.model_path(cfg)
  return Preflight(path, models.read_config(path), None)


def _learning_rate(cfg: config_lib.RunConfig, model_cfg, factor: float) -> float:
  if cfg.train.lr is not None:
    return cfg.train.lr
  try:
    rule = (hparams.full_ft_lr(model_cfg) if cfg.train.method == "full" else
            hparams.lora_lr(model_cfg, cfg.train.steps))
    return rule * factor
  except ValueError as e:
    raise ValueError(f"{e} (or set train.lr)") from None


def config_spec(cfg: config_lib.RunConfig, model_cfg) -> lora.LoraSpec:
  """The LoraSpec a config asks for (full fine-tuning: every parameter, no adapters). A
  ``lora.init`` adapter brings its own spec instead (``build``)."""
  if cfg.train.method == "full":
    return lora.LoraSpec.full_fine_tuning()
  l = cfg.lora
  return models.lora_spec(model_cfg, l.rank, l.expert_rank, alpha=l.alpha, rslora=l.rslora,
                          targets=l.targets, full=tuple(l.full))


def abstract_plan(cfg: config_lib.RunConfig, model_cfg) -> lora.Plan:
  """The plan of a config without reading weights (shapes from an abstract init). Not for
  ``lora.init`` runs, whose spec comes from the adapter (``build``)."""
  return models.abstract_plan(model_cfg, config_spec(cfg, model_cfg))


def _adapter_shardings(model, plan: lora.Plan, mesh):
  return sharding.adapter_shardings(plan, sharding.logical_specs(models.abstract_params(model)),
                                    mesh)


@dataclasses.dataclass
class Base:
  """A loaded model: what ``build`` reads from disk, shared by every arm of a study."""
  model: Any
  params: Any
  model_cfg: Any
  tok: data.Tokenizer
  mesh: Any
  shared: bool = False  # arms share it: the trainable copy must not alias (donation)


def load_base(cfg: config_lib.RunConfig, pre: Preflight, log: Callable[[str], None] = print,
              shared: bool = False) -> Base:
  """The model's weights and tokenizer on the config's mesh (writes nothing)."""
  mesh = mesh_lib.make_mesh(cfg.mesh)
  start = time.perf_counter()
  log(f"loading {os.path.basename(pre.model_path)} ({pre.model_cfg.num_layers} layers, "
      f"d={pre.model_cfg.hidden_size}) on {mesh.size} {jax.devices()[0].platform} device(s)")
  model, params, model_cfg = models.load(pre.model_path, dtype=cfg.model.dtype,
                                         remat=cfg.model.remat, mesh=mesh,
                                         lora_impl=cfg.model.lora_impl,
                                         quantize=cfg.model.quantize,
                                         quantize_embeddings=cfg.model.quantize_embeddings,
                                         double_quant=cfg.model.double_quant)
  tok = data.Tokenizer.from_model(pre.model_path)
  models.gguf_loader.release()  # weights and tokenizer are read: the parsed metadata can go
  log(f"loaded in {time.perf_counter() - start:.1f} s")
  if cfg.model.quantize != "none":
    emb = quant.embedding_format(cfg.model.quantize, cfg.model.quantize_embeddings)
    log(f"base stored as {cfg.model.quantize}"
        f"{' (scales double-quantised)' if cfg.model.double_quant else ''} "
        f"(embeddings {emb}, norms {cfg.model.dtype}): "
        f"{quant.stored_bytes(params) / 2**20:,.1f} MiB" +
        ("; model.lora_impl selects the Pallas kernel, which takes a dense W: quantised "
         "projections run on XLA" if kernels.selects_pallas(cfg.model.lora_impl) else ""))
  return Base(model, params, model_cfg, tok, mesh, shared)


def build(cfg: config_lib.RunConfig, pre: Preflight | None = None,
          log: Callable[[str], None] = print, base: Base | None = None,
          emit: events.Listener = events.ignore) -> Setup:
  """Load the model (or take ``base``, loaded once for several runs) and build everything
  the first step needs (writes nothing). ``emit`` hears the "set-up" phase start once the
  weights are loaded."""
  pre = pre or preflight(cfg)
  base = base or load_base(cfg, pre, log)
  emit(events.phase("set-up"))
  model, params, model_cfg, mesh = base.model, base.params, base.model_cfg, base.mesh
  if cfg.lora.init is not None and cfg.train.method == "lora":
    adapters, spec, new_params = adapters_lib.load(cfg.lora.init, params, model_cfg)
    plan = lora.plan(params, spec)
    adapters = jax.device_put(adapters, _adapter_shardings(model, plan, mesh))
    params = sharding.place_like(new_params, params)
  else:
    plan = lora.plan(params, config_spec(cfg, model_cfg))
    # The key is an argument, not a constant: every seed runs one program (one compile, and
    # one entry in a persistent compile cache).
    adapters = jax.jit(lambda p, key: lora.init_adapters(p, plan, key),
                       out_shardings=_adapter_shardings(model, plan, mesh))(
                           params, jax.random.PRNGKey(cfg.train.seed))
  trainable, frozen = optim.trainable(params, adapters, plan)
  if quantized := [p for p, x in lora.flatten(trainable["full"]).items()
                   if quant.is_quantized(x)]:
    raise ValueError(f"lora.full trains '{quantized[0]}' in full, but model.quantize="
                     f"{cfg.model.quantize!r} stores it quantised")
  if base.shared:  # the step donates the trainable state: never the shared base's arrays
    trainable = jax.tree_util.tree_map(jax.numpy.copy, trainable)
  lr = _learning_rate(cfg, model_cfg, pre.lr_factor)
  t = cfg.train
  lr_schedule = optim.schedule(lr, t.steps, t.schedule, t.warmup_steps)
  tx = optim.optimizer(lr_schedule, b_lr_ratio=t.b_lr_ratio, weight_decay=t.weight_decay,
                       max_grad_norm=t.grad_clip or None)  # 0: no clipping
  return Setup(cfg, model, model_cfg, base.tok, plan, mesh, frozen, trainable, lr,
               lr_schedule, tx)


def describe(s: Setup) -> str:
  """One line: the model, what is trained, and the learning rate."""
  t = s.cfg.train
  what = (f"LoRA r={s.spec.rank} alpha={s.spec.alpha:g}, {len(s.plan.targets)} kernels, "
          f"{s.plan.adapter_params:,} adapter params" if t.method == "lora"
          else "full fine-tuning")
  experts = [x for x in s.plan.targets.values() if "e" in x.layout]
  if t.method == "lora" and experts:
    what += (f" (experts r={experts[0].rank} each: r // {s.spec.active_experts}, "
             f"lora.expert_rank = {s.cfg.lora.expert_rank!r})")
  return f"{what}; lr {s.lr:.3g} ({t.schedule})"

