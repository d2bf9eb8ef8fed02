"""The training run behind ``jlora train``: model + data + optimizer from a RunConfig, the
jitted step in a loop with logging, held-out evaluation, checkpoints and exact resume.

Run directory layout::

    RUN_DIR/config.json      the resolved config (what --resume and jlora generate read)
    RUN_DIR/start.json       held-out loss / accuracy before training
    RUN_DIR/metrics.jsonl    one line per logged step (and metrics.csv, tb/ for TensorBoard)
    RUN_DIR/checkpoints/N/   orbax: trainable state, optimizer, data iterator, meta
    RUN_DIR/adapters.safetensors  the final LoRA factors (flat "path/a", "path/b")
    RUN_DIR/summary.json     loss and accuracy before/after, throughput, sizes

Nothing existing is overwritten: a fresh run refuses a non-empty directory, ``--resume``
refuses a changed model, LoRA spec, method or data, and metrics logged after the last
checkpoint (by a run that was killed) are dropped when it resumes, so the files always
describe the one trajectory the checkpoints continue.
"""

from __future__ import annotations

import csv
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
from jlora import sharding, train
from jlora.data import render

# Config sections that must not change across --resume (they define the state on disk).
_FROZEN_ON_RESUME = ("model", "lora", "train.method", "train.seed", "data", "mesh")


class NonFiniteLoss(RuntimeError):
  pass


# ----------------------------------------------------------------------------- run dir

def _prepare_run_dir(cfg: config_lib.RunConfig, resume: bool) -> str:
  run_dir = os.path.abspath(cfg.run_dir)
  saved = os.path.join(run_dir, "config.json")
  if resume:
    if not os.path.isfile(saved):
      raise ValueError(f"{run_dir}: nothing to resume (no config.json)")
    with open(saved) as f:
      before = json.load(f)
    now = cfg.to_dict()
    for key in _FROZEN_ON_RESUME:
      a, b = before, now
      for part in key.split("."):
        a, b = a.get(part), b.get(part)
      if a != b:
        raise ValueError(f"cannot resume {run_dir}: {key} changed (saved {json.dumps(a)}, "
                         f"now {json.dumps(b)})")
  else:
    if os.path.isdir(run_dir) and os.listdir(run_dir):
      raise ValueError(f"{run_dir} already holds a run: add --resume to continue it, or "
                       "set run_dir to a new directory")
    try:
      os.makedirs(run_dir, exist_ok=True)
      with open(saved, "w") as f:
        f.write(cfg.to_json())
    except OSError as e:
      raise ValueError(f"{run_dir}: cannot write the run directory ({e.strerror})") from None
  if not os.access(run_dir, os.W_OK):
    raise ValueError(f"{run_dir}: cannot write the run directory (permission denied)")
  return run_dir


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


def setup(cfg: config_lib.RunConfig) -> Setup:
  path = config_lib.model_path(cfg)
  mesh = sharding.make_mesh(sharding.MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.data.batch_size % shards:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by the mesh's "
                     f"data x fsdp = {shards} shards (set mesh.data, or the batch size)")
  model, params, model_cfg = models.load(path, dtype=cfg.model.dtype, remat=cfg.model.remat,
                                         mesh=mesh)
  tok = data.Tokenizer.from_model(path)
  if cfg.train.method == "full":
    spec = jlora.LoraSpec(rank=1, targets=None, full=(".*",))
    adapters = {}
  else:
    l = cfg.lora
    spec = models.lora_spec(model_cfg, l.rank, alpha=l.alpha, rslora=l.rslora,
                            targets=l.targets, full=tuple(l.full))
    abstract = models.abstract_params(model)
    shapes = models.param_shapes(model, abstract)
    shardings = sharding.adapter_shardings(shapes, sharding.logical_specs(abstract), spec, mesh)
    key = jax.random.PRNGKey(cfg.train.seed)
    adapters = jax.jit(lambda p: jlora.init_adapters(p, spec, key),
                       out_shardings=shardings)(params)
  trainable, frozen = optim.trainable(params, adapters, spec)
  lr = _learning_rate(cfg, model_cfg)
  tx = optim.optimizer(schedule(lr, cfg.train), b_lr_ratio=cfg.train.b_lr_ratio,
                       weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.grad_clip)
  return Setup(cfg, model, model_cfg, tok, spec, mesh, frozen, trainable, lr, tx)


def eval_data_config(cfg: config_lib.RunConfig) -> data.DataConfig | None:
  """The held-out data: ``eval.source``, or the training source's ``eval.split`` where
  sources have splits (tasks, TFDS); None for a single file with no held-out part."""
  source = cfg.eval.source
  if source is None:
    s = cfg.data.source
    if not (s.startswith(("task:", "tfds:")) or data.sources.is_tfds_dir(s)):
      return None
    source = s
  return dataclasses.replace(cfg.data, source=source, split=cfg.eval.split, shuffle=False,
                             epochs=1, prefetch=0,
                             size=cfg.data.size and max(cfg.data.size // 10, 1))


def eval_batches(cfg: config_lib.RunConfig, tok) -> list[dict]:
  dcfg = eval_data_config(cfg)
  if dcfg is None or cfg.eval.batches == 0:
    return []
  out = []
  for batch in data.dataset(dcfg, tok):
    out.append(batch)
    if len(out) == cfg.eval.batches:
      break
  return out


def _params(s: Setup, trainable) -> Any:
  return optim.combine(trainable["full"], s.frozen)


def accuracy(s: Setup, trainable, records: list[dict], task) -> float:
  """Greedy answers to held-out task prompts, checked by the task."""
  d = s.cfg.data
  prompts = [render.prompt_ids(r, s.tok, d.fields, d.chat, d.system) for r in records]
  width = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):], mask[i, width - len(p):] = p, 1
  lora = trainable["lora"] if trainable["lora"] else None
  out = np.asarray(models.generate(s.model, _params(s, trainable), tokens,
                                   max_new_tokens=s.cfg.eval.max_new_tokens,
                                   prompt_mask_BP=mask, adapters=lora,
                                   spec=s.spec if lora else None))
  correct = 0
  for row, record in zip(out, records):
    ids = row.tolist()
    if s.tok.eos_id in ids:
      ids = ids[:ids.index(s.tok.eos_id)]
    correct += task.check(s.tok.decode(ids), record["answer"])
  return correct / len(records)


def _task_records(cfg: config_lib.RunConfig) -> tuple[Any, list[dict]]:
  dcfg = eval_data_config(cfg)
  if dcfg is None or cfg.eval.examples == 0:
    return None, []
  source = data.open_source(dcfg)
  task = getattr(source, "task", None)
  if task is None:
    return None, []
  return task, [source[i] for i in range(min(cfg.eval.examples, len(source)))]


# ----------------------------------------------------------------------------- logging

class _Metrics:
  """metrics.jsonl + metrics.csv + TensorBoard (tensorboardX) in the run directory."""

  FIELDS = ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "eval_loss",
            "elapsed_s")

  def __init__(self, run_dir: str, resume_step: int | None):
    self.jsonl = os.path.join(run_dir, "metrics.jsonl")
    self.csv = os.path.join(run_dir, "metrics.csv")
    if resume_step is not None:  # drop what a killed run logged after its last checkpoint
      for path in (self.jsonl, self.csv):
        if os.path.isfile(path):
          self._truncate(path, resume_step)
    new_csv = not os.path.isfile(self.csv)
    self._csv_file = open(self.csv, "a", newline="")
    self._csv = csv.DictWriter(self._csv_file, self.FIELDS, extrasaction="ignore")
    if new_csv:
      self._csv.writeheader()
    self._jsonl_file = open(self.jsonl, "a")
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

  @staticmethod
  def _truncate(path: str, step: int) -> None:
    with open(path) as f:
      lines = f.readlines()
    keep = []
    for i, line in enumerate(lines):
      if path.endswith(".csv") and i == 0:
        keep.append(line)
        continue
      try:
        value = json.loads(line)["step"] if path.endswith(".jsonl") else int(line.split(",")[0])
      except (ValueError, KeyError):
        continue  # a line cut short by the kill
      if value <= step and line.endswith("\n"):
        keep.append(line)
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)

  def write(self, row: dict) -> None:
    self._jsonl_file.write(json.dumps(row) + "\n")
    self._jsonl_file.flush()
    self._csv.writerow(row)
    self._csv_file.flush()
    for k, v in row.items():
      if k != "step" and v is not None:
        self._tb.add_scalar(k, v, row["step"])

  def close(self) -> None:
    self._jsonl_file.close()
    self._csv_file.close()
    self._tb.close()


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
              dynamic_ncols=True)


# ----------------------------------------------------------------------------- the run

def _write_json(path: str, value: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
             if hasattr(x, "dtype"))


def save_adapters(path: str, adapters: Any, spec: jlora.LoraSpec) -> None:
  from safetensors.numpy import save_file
  flat = {p: np.asarray(x) for p, x in jlora.lora.flatten(adapters).items()}
  save_file(flat, path + ".tmp", metadata={"format": "jlora", "rank": str(spec.rank),
                                          "alpha": str(spec.alpha)})
  os.replace(path + ".tmp", path)


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
  run_dir = _prepare_run_dir(cfg, resume)
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
  held_out = [sharding.global_batch(b, s.mesh) for b in eval_batches(cfg, s.tok)]
  task, task_records = _task_records(cfg)

  def eval_loss(trainable) -> dict:
    if not held_out:
      return {}
    sums = [loss_fn(trainable, b) for b in held_out]
    return {"eval_loss": float(sum(x for x, _ in sums) / max(sum(n for _, n in sums), 1.0))}

  def evaluate(trainable) -> dict:
    out = eval_loss(trainable)
    if task_records:
      out["accuracy"] = accuracy(s, trainable, task_records, task)
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
    before = evaluate(state["trainable"])
    _write_json(start_file, before)
    log("before training: " + (", ".join(f"{k} {v:.4g}" for k, v in before.items()) or
                               "no held-out data"))
  metrics_out = _Metrics(run_dir, first if resume else None)  # drops rows after `first`
  bar = _progress(t.steps, first, progress)
  begin, seen_tokens, last, after = time.perf_counter(), 0, None, {}
  lr_at = schedule(s.lr, t)
  good_step, bad = first, None
  try:
    for step in range(first, t.steps):
      batch = sharding.global_batch(next(it), s.mesh)
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
        after = evaluate(state["trainable"])
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
    after = evaluate(state["trainable"])
  stored = ckpts.stored_bytes(ckpts.latest_step())
  ckpts.close()
  if t.method == "lora":
    save_adapters(os.path.join(run_dir, "adapters.safetensors"), state["trainable"]["lora"],
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
  _write_json(os.path.join(run_dir, "summary.json"), summary)
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
  ids = np.asarray(out[0]).tolist()
  if s.tok.eos_id in ids:
    ids = ids[:ids.index(s.tok.eos_id)]
  return s.tok.decode(ids)
