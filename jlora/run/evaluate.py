"""Held-out evaluation data and task accuracy (greedy answers checked by the task)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jlora import data, models
from jlora.infra import mesh as mesh_lib, multihost
from jlora.run import config as config_lib
from jlora.data import render


def until_eos(ids, eos_id: int | None) -> list[int]:
  """Generated ids up to (not including) the first EOS."""
  ids = [int(i) for i in ids]
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


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
                             size=cfg.eval.size or (cfg.data.size and
                                                    max(cfg.data.size // 10, 1)))


def eval_batches(cfg: config_lib.RunConfig, tok) -> list[dict]:
  dcfg = eval_data_config(cfg)
  if dcfg is None or cfg.eval.batches == 0:
    return []
  out = []
  for batch in data.dataset(dcfg, tok):
    out.append(batch)
    if len(out) == cfg.eval.batches:
      break
  # each process reads its own rows: all keep the batches every process has
  return out[:min(multihost.gather_json(len(out)))]


def _prompt_batch(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Prompts left-padded into one batch: (tokens, mask)."""
  width = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):], mask[i, width - len(p):] = p, 1
  return tokens, mask


def answers(model, params, tok, dcfg: data.DataConfig, records: list[dict],
            max_new_tokens: int) -> list[str]:
  """The greedy completion of each record's prompt (prompts left-padded, one batch), up to
  EOS. ``params``: what the model sees (``optim.model_params``: adapters included)."""
  return _answers(model, params, tok, [(dcfg, records, max_new_tokens)], stacked=False)[0]


# Prompts per decode of a group's answers: a KV cache for this many rows at most (plus one
# run's own count where that is larger), so a group's evaluation holds about what one
# run's does (8 quickstart runs in one decode held a 1.1 GB cache: bench/RESULTS.md).
GROUP_ROWS = 128


def group_answers(model, params, tok, runs: list, max_rows: int = GROUP_ROWS
                  ) -> list[list[str]]:
  """``answers`` of the adapters stacked in ``params`` (``jlora.core.stack``), batched:
  ``runs[i]`` = (data config, records, max_new_tokens) of adapter i, or None for an
  adapter not asked (it gets no rows). Consecutive runs share a decode up to ``max_rows``
  prompts. Greedy decoding to the longest ``max_new_tokens`` of a decode, each run's cut to
  its own: the same tokens a shorter decode gives."""
  out, chunk, rows = [[] for _ in runs], [], 0
  asked = [i for i, run in enumerate(runs) if run]
  for n, i in enumerate(asked):
    chunk.append(i)
    rows += len(runs[i][1])
    following = asked[n + 1] if n + 1 < len(asked) else None
    if following is None or rows + len(runs[following][1]) > max_rows:
      said = _answers(model, params, tok, [runs[j] if j in chunk else None
                                           for j in range(len(runs))], stacked=True)
      for j in chunk:
        out[j] = said[j]
      chunk, rows = [], 0
  return out


def _answers(model, params, tok, runs: list, stacked: bool) -> list[list[str]]:
  prompts, rows = [], []
  for run in runs:
    dcfg, records, _ = run or (None, [], 0)
    prompts += [render.prompt_ids(r, tok, dcfg.fields, dcfg.chat, dcfg.system)
                for r in records]
    rows.append(len(records))
  tokens, mask = _prompt_batch(prompts)
  longest = max(run[2] for run in runs if run)
  out = models.sample(model, params, tokens, mask, jax.random.PRNGKey(0),
                      max_new_tokens=longest, temperature=0.0,
                      adapter_ids=np.repeat(np.arange(len(rows)), rows) if stacked
                      else None).tokens
  out = np.asarray(multihost.to_host(out))  # whole on every process
  said, start = [], 0
  for run, n in zip(runs, rows):
    said.append([tok.decode(until_eos(row[:run[2]], tok.eos_id)) for row in out[start:start + n]]
                if run else [])
    start += n
  return said


def accuracy(model, params, tok, dcfg: data.DataConfig, records: list[dict], task,
             max_new_tokens: int) -> float:
  """Fraction of ``records`` whose greedy answer (``answers``) the task accepts."""
  said = answers(model, params, tok, dcfg, records, max_new_tokens)
  return sum(task.check(text, r["answer"]) for text, r in zip(said, records)) / len(records)


def task_records(cfg: config_lib.RunConfig) -> tuple[Any, list[dict]]:
  dcfg = eval_data_config(cfg)
  if dcfg is None or cfg.eval.examples == 0:
    return None, []
  source = data.open_source(dcfg)
  task = getattr(source, "task", None)
  if task is None:
    return None, []
  return task, [source[i] for i in range(min(cfg.eval.examples, len(source)))]


def group_accuracy(setups: list, st, trainable, which: list[int]) -> list[float | None]:
  """Held-out greedy accuracy of runs ``which`` trained together (``jlora.run.group``):
  each run's adapter of the stacked ``trainable`` answering its own task's records, every
  run asked in shared decodes (``group_answers``); None for a run without a checkable
  task."""
  from jlora.core import optim, stack
  s0 = setups[0]
  tasks = [task_records(s.cfg) for s in setups]
  asked = [j for j in which if tasks[j][1]]
  if not asked:
    return [None] * len(which)
  params = stack.with_adapters(optim.combine(trainable["full"], s0.frozen), trainable["lora"],
                               st)
  runs = [(eval_data_config(s.cfg), tasks[j][1], s.cfg.eval.max_new_tokens)
          if j in asked else None for j, s in enumerate(setups)]
  said = mesh_lib.traced_in(group_answers, s0.mesh)(s0.model, params, s0.tok, runs)
  out = []
  for j in which:
    task, records = tasks[j]
    out.append(sum(task.check(text, r["answer"]) for text, r in zip(said[j], records))
               / len(records) if j in asked else None)
  return out


def with_accuracy(s, eval_loss: Callable[[Any], dict]) -> Callable[[Any], dict]:
  """A run's held-out metrics: ``eval_loss(trainable)`` and, for a task that checks
  answers, greedy ``accuracy`` on its first ``eval.examples`` held-out records (``s``: the
  run's ``build.Setup``)."""
  from jlora.core import optim
  task, records = task_records(s.cfg)

  def metrics(trainable) -> dict:
    out = eval_loss(trainable)
    if records:
      out["accuracy"] = mesh_lib.traced_in(accuracy, s.mesh)(
          s.model, optim.model_params(trainable, s.frozen, s.plan), s.tok, s.cfg.data,
          records, task, s.cfg.eval.max_new_tokens)
    return out
  return metrics


def with_group_accuracy(setups: list, st, eval_loss: Callable) -> Callable:
  """``with_accuracy`` for runs trained together: (trainable, which) -> their metrics."""
  def metrics(trainable, which) -> list[dict]:
    out = eval_loss(trainable, which)
    for i, acc in enumerate(group_accuracy(setups, st, trainable, which)):
      if acc is not None:
        out[i]["accuracy"] = acc
    return out
  return metrics


def tagged(batches: list[list[dict]], mesh) -> list[list[Any]]:
  """Each run's held-out host batches as global batches with ``"adapter"`` (its index on
  every row): what a group's stacked loss evaluates."""
  return [[mesh_lib.global_batch({**b, "adapter": np.full(len(b["inputs"]), j, np.int32)},
                                 mesh) for b in run] for j, run in enumerate(batches)]
