"""Rollouts: the RL batch source for the run loop (``plug.Batches``).

Each ``next(state)`` takes the next ``prompts_per_step`` prompts (a seeded permutation per
epoch of the data source), repeats each ``group_size`` times, samples completions from the
current policy (``models.sample``: base + adapters, never merged; one jitted program per
prompt-width bucket, the rows split over the mesh's data axes), scores them on the host,
centres the rewards within each group and returns the training batch for
``losses.policy_loss``. Its state for checkpoints is the number of prompts consumed and
the sampling PRNG key, so a resumed run samples exactly what the uninterrupted one would.

``rl.updates_per_batch`` = K: each sampled batch is trained on K times, K optimizer steps
over the whole batch (epochs, as TRL's ``num_iterations`` and GRPO's mu: every update sees
every group, so each keeps the group-centred advantages whole and the step its one shape
and compiled program), so from the second update the ratio and the clip act. A
checkpoint between the K updates holds the batch itself (host arrays as JSON: a few
KB), so a resume mid-batch trains on exactly that batch.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jlora import data, models
from jlora.core import optim, stack
from jlora.infra import mesh as mesh_lib, multihost
from jlora.run import evaluate, group
from jlora.data import render
from jlora.objectives.rl import losses, rewards
from jlora.objectives.rl.section import OVERLONG
from jlora.objectives.rl.layout import Episodes, grouped, left_pad, training_batch, widened


def overlong(scores, lengths, ended, max_new_tokens: int, mode: str = "none",
             buffer: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """DAPO's overlong handling (Yu et al. 2025, sec. 3.4), where EOS is known: (rewards,
  rows kept). ``filter``: a completion cut at ``max_new_tokens`` without EOS trains on
  nothing (its row's mask 0; its reward still centres its group). ``penalty``: the soft
  overlong punishment, a reward minus (length - (L - buffer)) / buffer over the last
  ``buffer`` tokens of L = ``max_new_tokens``, and -1 for a completion cut without EOS."""
  scores = np.asarray(scores, np.float64)
  keep = np.ones(len(scores), bool)
  cut = ~np.asarray(ended, bool)
  if mode == "filter":
    keep = ~cut
  elif mode == "penalty":
    start = max_new_tokens - buffer
    over = np.clip((np.asarray(lengths) - start) / max(buffer, 1), 0.0, 1.0)
    scores = scores - np.where(cut, 1.0, over)
  elif mode != "none":
    raise ValueError(f"rl.overlong {mode!r} is not one of {', '.join(OVERLONG)}")
  return scores, keep


class Reuse:
  """A sampled host batch trained on ``updates`` times (``rl.updates_per_batch``): ``take``
  gives it again until it has been used that often (None: sample a new one and ``keep``
  it); its state carries a batch still in use (JSON: each array's dtype and values)."""

  def __init__(self, updates: int):
    self.updates, self.batch, self.uses = updates, None, 0

  def take(self):
    if self.batch is None or self.uses >= self.updates:
      return None
    self.uses += 1
    return self.batch

  def keep(self, batch):
    self.batch, self.uses = (batch if self.updates > 1 else None), 1
    return batch

  def get_state(self) -> dict:
    if self.batch is None or self.uses >= self.updates:
      return {}
    return {"batch_uses": self.uses, "batch": {
        k: {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.ravel().tolist()}
        for k, v in self.batch.items()}}

  def set_state(self, state: dict) -> None:
    self.batch, self.uses = None, 0
    if "batch" in state:
      self.uses = int(state["batch_uses"])
      self.batch = {k: np.asarray(v["values"], v["dtype"]).reshape(v["shape"])
                    for k, v in state["batch"].items()}


class Placed:
  """The device batch of the host batch in use, kept while ``Reuse`` gives that batch
  again: placed once, its reference log-probs computed once (the reference, the base with
  adapters off or the start of leaves trained in full, does not change)."""

  def __init__(self):
    self.host, self.batch = None, None

  def get(self, host: dict, place, reference, ref_logprobs, state) -> dict:
    if host is not self.host:
      self.host, self.batch = host, place()
      if reference is not None:
        self.batch["ref_logprobs"] = ref_logprobs(reference(state["trainable"]), self.batch)
    return dict(self.batch)


def _place_whole(batch: dict, mesh) -> dict:
  """A batch every process holds whole, as global arrays: each places its own rows."""
  rows = multihost.local_rows(len(next(iter(batch.values()))))
  return mesh_lib.global_batch({k: v[rows] for k, v in batch.items()}, mesh)


class Rollouts:
  """``plug.Batches`` for RL (see the module docstring). ``s``: a ``build.Setup``."""

  def __init__(self, s, source, reference=None):
    self.s, self.rl, self.source = s, s.cfg.rl, source
    self.reward_fn = rewards.load(self.rl.reward)
    self.reference = reference  # trainable -> reference params, or None: no KL tracked
    self._ref_logprobs = losses.reference_logprobs(s.model, s.cfg.train.loss_chunk, s.mesh)
    self.used = 0  # prompts consumed
    self.key = jax.random.PRNGKey(s.cfg.train.seed + 1)
    self._order: tuple[int, np.ndarray] | None = None
    self.last: dict = {}
    self.reuse = Reuse(self.rl.updates_per_batch)
    self.placed = Placed()

  # --- plug.Batches ------------------------------------------------------------------
  def get_state(self) -> dict:
    return {"prompts_used": self.used,
            "key": np.asarray(jax.random.key_data(self.key)).tolist(),
            **self.reuse.get_state()}

  def set_state(self, state: dict) -> None:
    self.used = int(state["prompts_used"])
    self.key = jax.numpy.asarray(np.asarray(state["key"], np.uint32))
    self.reuse.set_state(state)

  def close(self) -> None:
    pass

  def metrics(self) -> dict:
    """The last step's sampling metrics (merged into the run's metrics row)."""
    return self.last

  def next(self, state) -> dict:
    host = self.reuse.take()
    if host is None:
      begin = time.perf_counter()
      records, key = self.draw()
      ep = self.sample(state["trainable"], records, self.rl.group_size, key,
                       self.rl.temperature)
      host = self.reuse.keep(self.host_batch(ep, time.perf_counter() - begin))
    else:
      self.last = {**self.last, "sample_s": 0.0, "sampled_tokens_per_s": None}
    return self.placed.get(host, lambda: _place_whole(host, self.s.mesh), self.reference,
                           self._ref_logprobs, state)

  def draw(self) -> tuple[list[dict], jax.Array]:
    """The next step's prompts (``rl.prompts_per_step`` records) and its sampling key:
    the run's position advanced by one step."""
    records = self._records(self.rl.prompts_per_step)
    self.key, sub = jax.random.split(self.key)
    return records, sub

  def layout(self, ep: Episodes) -> int:
    """``training_batch``'s ``group`` for this run's episodes ``ep`` (``grouped``)."""
    s = self.s
    divisor = s.mesh.shape["data"] * s.mesh.shape["fsdp"] * s.cfg.train.grad_accum
    return grouped(ep, self.rl.group_size, divisor, s.model)

  def host_batch(self, ep: Episodes, seconds: float, group: int | None = None) -> dict:
    """A step's episodes scored, centred per group and laid out for the loss (host
    arrays, ``training_batch`` by ``group``, by default ``layout``'s); the step's sampling
    metrics kept for ``metrics`` (``seconds``: the time its sampling took)."""
    ended = np.asarray([n > 0 and row[n - 1] == self.s.tok.eos_id
                        for row, n in zip(ep.tokens, ep.lengths)])
    scores, overlong_keep = overlong(self.score(ep), ep.lengths, ended,
                                     self.rl.max_new_tokens, self.rl.overlong,
                                     self.rl.overlong_buffer)
    adv = losses.advantages(scores, self.rl.group_size, self.rl.normalize_std)
    constant = losses.constant_groups(scores, self.rl.group_size)
    keep = (~constant if self.rl.drop_constant_groups else np.ones_like(constant)) \
        & overlong_keep
    tokens = int(ep.lengths.sum())
    self.last = {
        "reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
        "correct": float(np.mean([self._correct(t, r) for t, r in zip(ep.texts, ep.records)]))
        if "answer" in ep.records[0] else None,
        "completion_tokens": float(ep.lengths.mean()), "constant_groups": float(constant.mean()),
        "sample_s": seconds, "sampled_tokens_per_s": tokens / seconds}
    return training_batch(ep, adv, keep, self.layout(ep) if group is None else group)

  # --- pieces --------------------------------------------------------------------------
  def _records(self, n: int) -> list[dict]:
    """The next ``n`` records: epoch e visits the source in a permutation seeded by
    (the data's order seed, e): ``pipeline.order_seed``."""
    size = len(self.source)
    out = []
    for i in range(self.used, self.used + n):
      epoch, j = divmod(i, size)
      if self._order is None or self._order[0] != epoch:
        perm = np.random.default_rng([data.order_seed(self.s.cfg.data), epoch]
                                     ).permutation(size)
        self._order = (epoch, perm if self.s.cfg.data.shuffle else np.arange(size))
      out.append(dict(self.source[int(self._order[1][j])], _index=int(self._order[1][j])))
    self.used += n
    return out

  def prompt_ids(self, record: dict) -> np.ndarray:
    d = self.s.cfg.data
    return render.prompt_ids(record, self.s.tok, d.fields, d.chat, d.system)

  def sample(self, trainable, records: list[dict], group: int, key, temperature: float
             ) -> Episodes:
    """``group`` completions of each record's prompt from the policy ``trainable``."""
    s, rl = self.s, self.rl
    shared = _prefill_group(group, len(records), s.mesh)
    ids = [self.prompt_ids(r) for r in records for _ in range(group // shared)]
    prompts, mask = left_pad(ids, _width(ids, rl, s.model_cfg))
    placed = _place_whole({"t": prompts, "m": mask}, s.mesh)
    out = mesh_lib.traced_in(models.sample, s.mesh)(
        s.model, optim.model_params(trainable, s.frozen, s.plan), placed["t"], placed["m"],
        key, group=shared, max_new_tokens=rl.max_new_tokens, temperature=temperature,
        top_p=rl.top_p, eos_id=s.tok.eos_id, pad=s.tok.eos_id or 0)
    prompts, mask = (np.repeat(x, shared, axis=0) for x in (prompts, mask))
    return _episodes(s.tok, multihost.to_host(out), [r for r in records for _ in range(group)],
                     prompts, mask)

  def score(self, ep: Episodes) -> np.ndarray:
    return np.asarray([
        rewards.score(self.reward_fn, self.rl.reward, r.get("prompt", ""), text,
                      {k: v for k, v in r.items() if k != "_index"}, r["_index"],
                      self.rl.format_reward)
        for text, r in zip(ep.texts, ep.records)], np.float64)

  @staticmethod
  def _correct(text: str, record: dict) -> bool:
    return rewards.correct(text, record["answer"])


def _prefill_group(group: int, prompts: int, mesh) -> int:
  """The rows that share one prefill of their prompt (``models.sample(group=...)``): the
  whole group, unless the prompts alone do not split over the data shards (then every row
  is a prompt of its own)."""
  return group if prompts % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else 1


def _width(ids: list, rl, model_cfg) -> int:
  """The padded width of prompts ``ids`` (``rl.bucket``); one line if the prompts and
  ``rl.max_new_tokens`` exceed the model's positions."""
  width = models.bucket(max(len(p) for p in ids), rl.bucket)
  limit = model_cfg.max_position_embeddings
  if width + rl.max_new_tokens > limit:
    raise ValueError(f"prompts of {width} tokens + rl.max_new_tokens={rl.max_new_tokens} "
                     f"exceed the model's {limit} positions")
  return width


def _episodes(tok, out, records: list[dict], prompts: np.ndarray, mask: np.ndarray
              ) -> Episodes:
  """Sampled rows (``out``: host ``Samples``, every process's copy) as ``Episodes``."""
  texts = [tok.decode(evaluate.until_eos(row[:n], tok.eos_id))
           for row, n in zip(out.tokens, out.lengths)]
  return Episodes(records, prompts, mask, np.asarray(out.tokens), np.asarray(out.logprobs),
                  np.asarray(out.lengths), texts)


def sample_together(runs: list[Rollouts], params, drawn: list[tuple[list[dict], jax.Array]]
                    ) -> list[Episodes]:
  """One decode for a step of several runs (``jlora rl A B``): run i's records
  (``drawn[i]``, with its key), each repeated ``rl.group_size`` times, through adapter i of
  the stack in ``params`` (``stack.with_adapters``). Row r of run i samples with
  ``fold_in(its key, r)``, as row r of its solo run does, and its prompt is cut back to the
  run's own width: each run's episodes are its solo run's (up to the float rounding of a
  bigger batch). The runs share ``rl.max_new_tokens``, ``temperature`` and ``top_p``
  (``RL_SHARED``)."""
  s, rl = runs[0].s, runs[0].rl
  # As a solo run samples (``_prefill_group``) where the runs' groups are of one size; else
  # every row is a prompt of its own (a prefill per sample: group_size times the work).
  sizes = {run.rl.group_size for run in runs}
  shared = _prefill_group(sizes.pop(), sum(len(d[0]) for d in drawn), s.mesh) \
      if len(sizes) == 1 else 1
  ids, keys, adapter, widths, expanded = [], [], [], [], []
  for i, (run, (records, key)) in enumerate(zip(runs, drawn)):
    own = [run.prompt_ids(r) for r in records for _ in range(run.rl.group_size // shared)]
    widths.append(_width(own, run.rl, s.model_cfg))
    ids += own
    expanded.append([r for r in records for _ in range(run.rl.group_size)])
    keys.append(jax.vmap(lambda r, key=key: jax.random.fold_in(key, r))(
        jnp.arange(len(expanded[-1]))))
    adapter += [i] * len(own)
  prompts, mask = left_pad(ids, max(widths))
  placed = _place_whole({"t": prompts, "m": mask, "a": np.asarray(adapter, np.int32)}, s.mesh)
  placed["k"] = _place_whole({"k": np.asarray(jnp.concatenate(keys))}, s.mesh)["k"]  # per row
  out = multihost.to_host(mesh_lib.traced_in(models.sample, s.mesh)(
      s.model, params, placed["t"], placed["m"], placed["k"], max_new_tokens=rl.max_new_tokens,
      group=shared, temperature=rl.temperature, top_p=rl.top_p, eos_id=s.tok.eos_id,
      pad=s.tok.eos_id or 0, adapter_ids=placed["a"]))
  prompts, mask = (np.repeat(x, shared, axis=0) for x in (prompts, mask))
  episodes, start = [], 0
  for records, width in zip(expanded, widths):
    rows = slice(start, start + len(records))
    episodes.append(_episodes(s.tok, jax.tree_util.tree_map(lambda x: x[rows], out), records,
                              prompts[rows, -width:], mask[rows, -width:]))
    start += len(records)
  return episodes


class GroupRollouts:
  """``plug.Batches`` of RL runs trained together (``jlora.run.group``): each run draws its
  step's prompts and key from its own ``Rollouts`` (its position, its checkpointed state),
  all sample in one decode (``sample_together``), each scores and centres its own
  episodes, and the runs' batches become one batch of micro-batches of one run each
  (``group.combine``; sequences left-padded to the widest run's)."""

  def __init__(self, runs: list[Rollouts], st, micro: int):
    self.runs, self.st, self.micro = runs, st, micro

  def next(self, state) -> dict:
    s = self.runs[0].s
    # each run keeps its own part of a batch still in use (its checkpoints hold it); the
    # runs share rl.updates_per_batch (RL_SHARED) and step together
    parts = [run.reuse.take() for run in self.runs]
    if any(p is None for p in parts):
      begin = time.perf_counter()
      drawn = [run.draw() for run in self.runs]
      params = stack.with_adapters(optim.combine(state["trainable"]["full"], s.frozen),
                                   state["trainable"]["lora"], self.st)
      episodes = sample_together(self.runs, params, drawn)
      seconds = time.perf_counter() - begin
      # one layout for all: grouped where every run's is, with one group size
      layouts = {run.layout(ep) for run, ep in zip(self.runs, episodes)}
      layout = layouts.pop() if len(layouts) == 1 else 1
      parts = [run.host_batch(ep, seconds, layout) for run, ep in zip(self.runs, episodes)]
      width = max(p["inputs"].shape[1] for p in parts)
      parts = [run.reuse.keep(widened(p, width)) for run, p in zip(self.runs, parts)]
    else:
      for run in self.runs:
        run.last = {**run.last, "sample_s": 0.0, "sampled_tokens_per_s": None}
    # the base, adapters off: one reference for every run
    first = self.runs[0]
    return first.placed.get(parts[0], lambda: group.combine(parts, s.mesh, self.micro),
                            first.reference, first._ref_logprobs, state)

  def metrics(self) -> dict:
    return {}  # each run's own (its Rollouts' ``metrics``)

  def get_state(self) -> dict:
    return {"runs": [run.get_state() for run in self.runs]}

  def set_state(self, state: dict) -> None:
    for run, own in zip(self.runs, state["runs"]):
      run.set_state(own)

  def close(self) -> None:
    pass  # each run closes its own
