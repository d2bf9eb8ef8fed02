"""The training run behind ``jlora train``: model + data + optimizer from a RunConfig, the
jitted step in a loop with logging, held-out evaluation, checkpoints and exact resume. The
run directory's files are ``jlora.rundir``'s; held-out data and accuracy ``jlora.evaluate``'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import checkpoint, config as config_lib, data, hparams, models, optim
from jlora import evaluate, rundir, sharding, train
from jlora.data import render


class NonFiniteLoss(RuntimeError):
  pass


# ----------------------------------------------------------------------------- pieces

@dataclasses.dataclass
class Setup:
  """Everything a run builds from its config before the first step."""
  cfg: config_lib.RunConfig
  model: Any
  model_cfg: Any
  tok: data.Tokenizer
  spec: jlora.LoraSpec
  mesh: Any
  frozen: Any
  trainable: Any
  lr: float
  lr_schedule: Any  # a float or an optax schedule: what tx uses, for logging
  tx: optax.GradientTransformation


def schedule(lr: float, t: config_lib.TrainSection):
  """Constant (the findings' default) or cosine/linear decay to 0, after linear warm-up."""
  w = t.warmup_steps
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, w, max(t.steps, w + 1), 0.0)
  after = (optax.constant_schedule(lr) if t.schedule == "constant"
           else optax.linear_schedule(lr, 0.0, max(t.steps - w, 1)))
  if w == 0:
    return lr if t.schedule == "constant" else after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, w), after], [w])


def _learning_rate(cfg: config_lib.RunConfig, model_cfg) -> float:
  if cfg.train.lr is not None:
    return cfg.train.lr
  try:
    if cfg.train.method == "full":
      return hparams.full_ft_lr(model_cfg)
    return hparams.lora_lr(model_cfg, cfg.train.steps)
  except ValueError as e:
    raise ValueError(f"{e} (or set train.lr)") from None


def _adapter_shardings(model, spec, mesh):
  """Each adapter factor's sharding, derived from its kernel's (``jlora.sharding``)."""
  abstract = models.abstract_params(model)
  return sharding.adapter_shardings(models.param_shapes(model, abstract),
                                    sharding.logical_specs(abstract), spec, mesh)


def _from_peft(path: str, params, model, model_cfg, mesh):
  """(params, spec, adapters) starting from a PEFT adapter, placed like fresh ones."""
  from jlora import export
  adapters, spec, new_params = export.load_peft(path, params, model_cfg)
  adapters = jax.device_put(adapters, _adapter_shardings(model, spec, mesh))
  old = jlora.lora.flatten(params)
  new_params = {p: x if x is old[p] else jax.device_put(np.asarray(x, old[p].dtype),
                                                         old[p].sharding)
                for p, x in jlora.lora.flatten(new_params).items()}
  return jlora.lora.unflatten(new_params), spec, adapters


def setup(cfg: config_lib.RunConfig) -> Setup:
  path = config_lib.model_path(cfg)
  mesh = sharding.make_mesh(sharding.MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.data.batch_size % shards:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by the mesh's "
                     f"data x fsdp = {shards} shards (set mesh.data, or the batch size)")
  model, params, model_cfg = models.load(path, dtype=cfg.model.dtype, remat=cfg.model.remat,
                                         mesh=mesh, lora_impl=cfg.model.lora_impl)
  tok = data.Tokenizer.from_model(path)
  models.gguf_loader.release()  # weights and tokenizer are read: the parsed metadata can go
  if cfg.train.method == "full":
    spec = jlora.LoraSpec(rank=1, targets=None, full=(".*",))
    adapters = {}
  elif cfg.lora.init:
    params, spec, adapters = _from_peft(cfg.lora.init, params, model, model_cfg, mesh)
  else:
    l = cfg.lora
    spec = models.lora_spec(model_cfg, l.rank, alpha=l.alpha, rslora=l.rslora,
                            targets=l.targets, full=tuple(l.full))
    key = jax.random.PRNGKey(cfg.train.seed)
    adapters = jax.jit(lambda p: jlora.init_adapters(p, spec, key),
                       out_shardings=_adapter_shardings(model, spec, mesh))(params)
  trainable, frozen = optim.trainable(params, adapters, spec)
  lr = _learning_rate(cfg, model_cfg)
  lr_schedule = schedule(lr, cfg.train)
  tx = optim.optimizer(lr_schedule, b_lr_ratio=cfg.train.b_lr_ratio,
                       weight_decay=cfg.train.weight_decay,
                       max_grad_norm=cfg.train.grad_clip or None)  # 0: no clipping
  return Setup(cfg, model, model_cfg, tok, spec, mesh, frozen, trainable, lr, lr_schedule, tx)


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
              dynamic_ncols=True)


# ----------------------------------------------------------------------------- the run

def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
             if hasattr(x, "dtype"))


def _params(s: Setup, trainable) -> Any:
  return optim.combine(trainable["full"], s.frozen)


def advise(cfg: config_lib.RunConfig, stats_limit: int = 2000):
  """The advisor's findings for a run config (model config and a dataset sample only: no
  weights are read)."""
  from jlora import advisor
  path = config_lib.model_path(cfg)
  model_cfg = models.read_config(path)
  stats = data.stats(cfg.data, data.Tokenizer.from_model(path), limit=stats_limit)
  return advisor.advise_run(cfg, model_cfg, stats), stats


def run(cfg: config_lib.RunConfig, *, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, force: bool = False) -> dict:
  """Train per ``cfg``; returns the summary (also written to RUN_DIR/summary.json). The
  advisor's report is printed first; an "error" finding stops the run unless ``force``."""
  from jlora import advisor
  findings, stats = advise(cfg)
  log(f"data: {stats}")
  log(advisor.report(findings))
  if advisor.has_error(findings) and not force:
    raise ValueError("the advisor found an error (ERROR line above): fix the config, or "
                     "pass --force to train anyway")
  from jlora import kernels
  kernels.selects_pallas(cfg.model.lora_impl)  # e.g. "pallas" on CPU: say so before any work
  run_dir = rundir.prepare(cfg, resume)
  t = cfg.train
  s = setup(cfg)
  log(f"model {cfg.model.path}: {s.model_cfg.num_layers} layers, d={s.model_cfg.hidden_size}; "
      + (f"LoRA r={s.spec.rank} alpha={s.spec.alpha:g} on {cfg.lora.targets}, "
         f"{jlora.count_params(s.trainable['lora']):,} adapter params"
         if t.method == "lora" else "full fine-tuning")
      + f"; lr {s.lr:.3g} ({t.schedule})")
  state = train.init_state(s.trainable, s.tx, s.mesh)
  del s.trainable  # the state owns (and donates) them now
  step_fn = train.jit_step(train.make_step(s.model, s.spec, s.tx, t.grad_accum, t.loss_chunk),
                           state, s.frozen, s.mesh)
  loss_fn = jax.jit(lambda tr, batch: train.token_loss_sum(
      s.model, jlora.lora.with_adapters(_params(s, tr), tr["lora"], s.spec), batch,
      t.loss_chunk))
  held_out = [sharding.global_batch(b, s.mesh) for b in evaluate.eval_batches(cfg, s.tok)]
  task, task_records = evaluate.task_records(cfg)

  def eval_loss(trainable) -> dict:
    if not held_out:
      return {}
    sums = [loss_fn(trainable, b) for b in held_out]
    return {"eval_loss": float(sum(x for x, _ in sums) / max(sum(n for _, n in sums), 1.0))}

  def held_out_metrics(trainable) -> dict:
    out = eval_loss(trainable)
    if task_records:
      lora = trainable["lora"] or None
      out["accuracy"] = evaluate.accuracy(
          s.model, _params(s, trainable), lora, s.spec if lora else None, s.tok, cfg.data,
          task_records, task, cfg.eval.max_new_tokens)
    return out

  ckpts = checkpoint.Checkpoints(os.path.join(run_dir, "checkpoints"), keep=t.keep)
  it = iter(data.dataset(cfg.data, s.tok))
  start_file = os.path.join(run_dir, "start.json")
  first = 0
  if resume and ckpts.latest_step() is None:
    log(f"{run_dir} has no checkpoint yet: starting from step 0")
  if resume and ckpts.latest_step() is not None:
    state, data_state, meta = ckpts.restore(checkpoint.abstract(state))
    it.set_state(data_state)
    first = int(meta["step"])
    log(f"resumed {run_dir} at step {first}")
  else:
    before = held_out_metrics(state["trainable"])
    rundir.write_json(start_file, before)
    log("before training: " + (", ".join(f"{k} {v:.4g}" for k, v in before.items()) or
                               "no held-out data"))
  metrics_out = rundir.Metrics(run_dir, first if resume else None)  # drops rows after `first`
  bar = _progress(t.steps, first, progress)
  begin, seen_tokens, last, after = time.perf_counter(), 0, None, {}
  lr_at = s.lr_schedule
  good_step, bad = first, None
  try:
    for step in range(first, t.steps):
      batch = sharding.global_batch(next(it), s.mesh)
      if step == first:
        step_fn = train.compile_step(step_fn, state, s.frozen, batch)
      state, metrics = step_fn(state, s.frozen, batch)
      n = step + 1
      if step == first:  # throughput counts from here: the first step includes compilation
        jax.block_until_ready(metrics)
        begin = time.perf_counter()
      else:
        seen_tokens += batch["inputs"].size
      final = n == t.steps
      if n % t.log_every and n % t.checkpoint_every and not final:
        continue  # no host sync: the next step is dispatched right away
      m = jax.device_get(metrics)
      if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["finite"]):
        bad = n
        break
      good_step = n
      elapsed = time.perf_counter() - begin
      row = {"step": n, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
             "lr": float(lr_at(step) if callable(lr_at) else lr_at),
             "tokens": int(m["tokens"]),
             "tokens_per_s": seen_tokens / elapsed if seen_tokens else None,
             "elapsed_s": elapsed}
      if final:
        after = held_out_metrics(state["trainable"])
        row["eval_loss"] = after.get("eval_loss")
      elif cfg.eval.every and n % cfg.eval.every == 0:
        row["eval_loss"] = eval_loss(state["trainable"]).get("eval_loss")
      if n % t.checkpoint_every == 0 or final:
        ckpts.save(n, state, it.get_state(), {"step": n, "seed": t.seed, "loss": row["loss"]},
                   eval_loss=row.get("eval_loss"))
      metrics_out.write(row)
      last = row
      bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s'] or 0:.0f}")
      bar.update(n - bar.n)
  finally:
    bar.close()
    metrics_out.close()
    ckpts.wait()
    if hasattr(it, "close"):
      it.close()
  if bad is not None:
    kept = ckpts.latest_step()
    ckpts.close()
    raise NonFiniteLoss(f"loss, gradient or parameters became non-finite at step {bad} "
                        f"(last finite logged step {good_step}); last good checkpoint: "
                        f"{'none' if kept is None else f'step {kept}'} in {run_dir}/checkpoints")
  if not after:
    after = held_out_metrics(state["trainable"])
  stored = ckpts.stored_bytes(ckpts.latest_step())
  ckpts.close()
  if t.method == "lora":
    rundir.save_adapters(os.path.join(run_dir, "adapters.safetensors"), state["trainable"]["lora"],
                  s.spec)
  with open(start_file) as f:
    before = json.load(f)
  step_dir = os.path.join(run_dir, "checkpoints", str(t.steps))
  summary = {
      "steps": t.steps, "method": t.method, "lr": s.lr,
      "final_train_loss": last and last["loss"],
      "tokens_per_s": last and last["tokens_per_s"],
      "eval_loss_before": before.get("eval_loss"), "eval_loss_after": after.get("eval_loss"),
      "accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
      "accuracy_examples": len(task_records),
      "trainable_bytes": _tree_bytes(state["trainable"]),
      "optimizer_bytes": _tree_bytes(state["opt_state"]),
      "checkpoint_array_bytes": stored,  # what the last checkpoint holds: no frozen base
      "checkpoint_bytes": checkpoint.size_bytes(step_dir) if os.path.isdir(step_dir) else None,
  }
  rundir.write_json(os.path.join(run_dir, "summary.json"), summary)
  return summary


def load_trained(run_dir: str, step: int | None = None):
  """(Setup, trainable) of a finished or checkpointed run, for generation and export."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{run_dir}: not a run directory (no config.json)")
  cfg = config_lib.load(path)
  s = setup(cfg)
  ckpts = checkpoint.Checkpoints(os.path.join(run_dir, "checkpoints"), keep=cfg.train.keep)
  state = train.init_state(s.trainable, s.tx, s.mesh)
  state, _, _ = ckpts.restore(checkpoint.abstract(state), step)
  ckpts.close()
  return s, state["trainable"]


def generate(run_dir: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, step: int | None = None, chat: bool = True) -> str:
  s, trainable = load_trained(run_dir, step)
  ids = render.prompt_ids({"prompt": prompt}, s.tok, chat=chat, system=s.cfg.data.system)
  lora = trainable["lora"] if trainable["lora"] else None
  out = models.generate(s.model, _params(s, trainable), jnp.asarray(ids)[None],
                        max_new_tokens=max_new_tokens, temperature=temperature,
                        rng=jax.random.PRNGKey(seed), adapters=lora,
                        spec=s.spec if lora else None)
  return s.tok.decode(evaluate.until_eos(np.asarray(out[0]), s.tok.eos_id))
