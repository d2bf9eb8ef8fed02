"""``jlora train``: supervised fine-tuning as an objective of the shared run loop.

The pieces, in order: ``setup.preflight`` (cheap checks, nothing loaded), the run
directory's ``check`` (a changed config or a directory in use fails here), ``setup.build``
(weights, plan, optimizer), the advisor on the plan that will actually train, then
``rundir.create`` (locked) and ``loop.run`` with the SFT objective (``sft_objective``:
token cross-entropy, data batches, held-out loss and task accuracy). The summary and the
final adapters are written last.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora import advisor, atomic, checkpoint, config as config_lib, data, evaluate, loop
from jlora import models, multihost, optim, rundir, setup, sharding, train
from jlora.data import render
from jlora.loop import Interrupted, NonFiniteLoss, StorageFailed  # noqa: F401  (the CLI catches them here)


def sft_objective(s: setup.Setup) -> loop.Objective:
  """Supervised fine-tuning: token cross-entropy over the data's masked-in tokens; held
  out, the same loss and (for tasks that can check answers) greedy accuracy."""
  cfg = s.cfg
  loss = train.lm_loss(s.model, s.plan, cfg.train.loss_chunk)
  # frozen passed as an argument: not baked into the program
  loss_fn = jax.jit(sharding.traced_in(loss, s.mesh))
  held_out = [sharding.global_batch(b, s.mesh) for b in evaluate.eval_batches(cfg, s.tok)]
  task, records = evaluate.task_records(cfg)

  def eval_loss(trainable) -> dict:
    if not held_out:
      return {}
    sums = [loss_fn(trainable, s.frozen, b) for b in held_out]
    return {"eval_loss": float(sum(x for x, _ in sums) / max(sum(n for _, n in sums), 1.0))}

  def held_out_metrics(trainable) -> dict:
    out = eval_loss(trainable)
    if records:
      out["accuracy"] = sharding.traced_in(evaluate.accuracy, s.mesh)(
          s.model, optim.model_params(trainable, s.frozen, s.plan), s.tok, cfg.data,
          records, task, cfg.eval.max_new_tokens)
    return out

  batches = loop.DataBatches(iter(data.dataset(cfg.data, s.tok)), s.mesh)
  return loop.Objective(loss, batches, held_out_metrics, eval_loss)


def advise(cfg: config_lib.RunConfig, pre: setup.Preflight | None = None):
  """The advisor's findings for a run config, from the model config and a data sample (no
  weights are read, except a ``lora.init`` adapter's shapes need the base)."""
  pre = pre or setup.preflight(cfg)
  if cfg.lora.init is not None and cfg.train.method == "lora":
    plan = setup.build(cfg, pre, log=lambda _: None).plan
  else:
    plan = setup.abstract_plan(cfg, pre.model_cfg)
  return advisor.advise_run(cfg, pre.model_cfg, pre.stats, plan), pre.stats


def _finished(cfg: config_lib.RunConfig, log) -> dict | None:
  """The summary of a run that already reached train.steps (a --resume with nothing to
  do: nothing is touched), else None."""
  run_dir = atomic.absolute(cfg.run_dir)
  steps = rundir.checkpoint_steps(run_dir)
  summary = atomic.join(run_dir, "summary.json")
  if not steps or steps[-1] < cfg.train.steps or not atomic.is_file(summary):
    return None
  log(f"{run_dir} already finished at step {steps[-1]} (train.steps = {cfg.train.steps}): "
      "nothing to do; raise train.steps to train further")
  return atomic.read_json(summary)


def run(cfg: config_lib.RunConfig, *, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, force: bool = False,
        objective: Callable[[setup.Setup], loop.Objective] = sft_objective,
        base: setup.Base | None = None,
        on_row: Callable[[dict], None] | None = None) -> dict:
  """Train per ``cfg`` with ``objective`` (SFT; ``jlora.rl.run`` passes RL's); returns the
  summary (also written to RUN_DIR/summary.json). The advisor's report is printed first; an
  "error" finding stops the run unless ``force``. ``base``: a model already loaded (the
  arms of a study share one). ``on_row``: called with each metrics row as it is written
  (row 0: held-out metrics before training). Raises ValueError for a user mistake, before
  anything is written."""
  if cfg.rl is not None and objective is sft_objective:
    raise ValueError("the config has an [rl] section: run it with jlora rl")
  if resume and (done := _finished(cfg, log)) is not None:
    return done
  pre = setup.preflight(cfg)
  log(f"data: {pre.stats}")
  rundir.check(cfg, resume)
  s = setup.build(cfg, pre, log, base)
  findings = advisor.advise_run(cfg, s.model_cfg, pre.stats, s.plan)
  log(advisor.report(findings))
  if advisor.has_error(findings) and not force:
    raise ValueError("the advisor found an error (ERROR line above): fix the config, or "
                     "pass --force to train anyway")
  log(f"model {cfg.model.path}: {setup.describe(s)}")
  made = objective(s)
  run_dir, lock = rundir.create(cfg, resume)
  try:
    result = loop.run(s, made, run_dir, resume=resume, log=log, progress=progress,
                      on_row=on_row)
    with loop.storage_failures(run_dir):
      return _finish(s, run_dir, result)
  finally:
    lock.release()


def _finish(s: setup.Setup, run_dir: str, result: loop.Result) -> dict:
  """adapters.safetensors and summary.json of a completed run."""
  t, trainable = s.cfg.train, result.state["trainable"]
  if t.method == "lora":
    rundir.save_adapters(atomic.join(run_dir, "adapters.safetensors"), trainable["lora"],
                         s.spec)
  last, before, after = result.last, result.before, result.after
  step_dir = atomic.join(run_dir, "checkpoints", str(t.steps))
  summary = {
      "steps": t.steps, "method": t.method, "lr": s.lr,
      "final_train_loss": last and last["loss"],
      "tokens_per_s": last and last["tokens_per_s"],
      "eval_loss_before": before.get("eval_loss"), "eval_loss_after": after.get("eval_loss"),
      "accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
      "accuracy_examples": s.cfg.eval.examples if "accuracy" in after else 0,
      "trainable_bytes": _tree_bytes(trainable),
      "optimizer_bytes": _tree_bytes(result.state["opt_state"]),
      "checkpoint_array_bytes": result.stored_bytes,  # the last checkpoint: no frozen base
      "checkpoint_bytes": checkpoint.size_bytes(step_dir) if atomic.is_dir(step_dir) else None,
  }
  for key in sorted(set(before) | set(after)):  # an objective's own held-out metrics
    summary.setdefault(f"{key}_before", before.get(key))
    summary.setdefault(f"{key}_after", after.get(key))
  if multihost.primary():
    atomic.write_json(atomic.join(run_dir, "summary.json"), summary)
  return summary


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
             if hasattr(x, "dtype"))


def generate(run_dir: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, step: int | None = None, chat: bool = True) -> str:
  """``jlora generate``: sample from a run's base + adapters (no merge)."""
  run = rundir.load_trained(run_dir, step)
  s = run.setup
  ids = render.prompt_ids({"prompt": prompt}, s.tok, chat=chat, system=s.cfg.data.system)
  params = optim.model_params(run.trainable, s.frozen, s.plan)
  out = sharding.traced_in(models.generate, s.mesh)(
      s.model, params, jnp.asarray(ids)[None], max_new_tokens=max_new_tokens,
      temperature=temperature, rng=jax.random.PRNGKey(seed))
  return s.tok.decode(evaluate.until_eos(np.asarray(out[0]), s.tok.eos_id))
