"""Rollouts: the RL batch source for the run loop (``loop.Batches``).

Each ``next(state)`` takes the next ``prompts_per_step`` prompts (a seeded permutation per
epoch of the data source), repeats each ``group_size`` times, samples completions from the
current policy (``models.sample``: base + adapters, never merged; one jitted program per
prompt-width bucket, the rows split over the mesh's data axes), scores them on the host,
centres the rewards within each group and returns the training batch for
``losses.policy_loss``. Its state for checkpoints is the number of prompts consumed and
the sampling PRNG key, so a resumed run samples exactly what the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jlora import data, models
from jlora.core import optim
from jlora.infra import mesh as mesh_lib, multihost
from jlora.run import evaluate
from jlora.data import render
from jlora.objectives.rl import losses, rewards


@dataclasses.dataclass
class Episodes:
  """One step's sampled episodes, on the host."""
  records: list[dict]  # [B] (each prompt's record repeated group_size times)
  prompts: np.ndarray  # [B, P] left-padded prompt ids
  prompt_mask: np.ndarray  # [B, P]
  tokens: np.ndarray  # [B, N] sampled ids (pad after EOS)
  logprobs: np.ndarray  # [B, N]
  lengths: np.ndarray  # [B]
  texts: list[str]  # [B] decoded completions (up to EOS)


def left_pad(prompts: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):], mask[i, width - len(p):] = p, 1
  return tokens, mask


def training_batch(ep: Episodes, advantages: np.ndarray, keep: np.ndarray) -> dict:
  """The ``losses.policy_loss`` batch: prompt + completion rows shifted by one
  (``inputs``/``targets``/``positions``/``segment_ids`` [B, P + N - 1]); the per-token
  fields cover the completion only, the last N targets (target P - 1 + k is the
  completion's token k): ``mask`` [B, N] on its tokens through EOS (rows in ``keep``),
  ``sampler_logprobs`` [B, N]; ``advantages`` [B]."""
  N = ep.tokens.shape[1]
  seq = np.concatenate([ep.prompts, ep.tokens], axis=1)
  real = np.concatenate([ep.prompt_mask, np.ones_like(ep.tokens)], axis=1)
  completion = np.arange(N)[None, :] < ep.lengths[:, None]
  positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "positions": positions[:, :-1],
          "segment_ids": real[:, :-1].astype(np.int32),
          "mask": (completion & keep[:, None]).astype(np.float32),
          "sampler_logprobs": np.where(completion, ep.logprobs, 0.0).astype(np.float32),
          "advantages": advantages.astype(np.float32)}


def _place_whole(batch: dict, mesh) -> dict:
  """A batch every process holds whole, as global arrays: each places its own rows."""
  rows = multihost.local_rows(len(next(iter(batch.values()))))
  return mesh_lib.global_batch({k: v[rows] for k, v in batch.items()}, mesh)


class Rollouts:
  """``loop.Batches`` for RL (see the module docstring). ``s``: a ``build.Setup``."""

  def __init__(self, s, source, reference=None):
    self.s, self.rl, self.source = s, s.cfg.rl, source
    self.reward_fn = rewards.load(self.rl.reward)
    self.reference = reference  # trainable -> reference params, or None: no KL tracked
    self._ref_logprobs = losses.reference_logprobs(s.model, s.cfg.train.loss_chunk, s.mesh)
    self.used = 0  # prompts consumed
    self.key = jax.random.PRNGKey(s.cfg.train.seed + 1)
    self._order: tuple[int, np.ndarray] | None = None
    self.last: dict = {}

  # --- loop.Batches ------------------------------------------------------------------
  def get_state(self) -> dict:
    return {"prompts_used": self.used,
            "key": np.asarray(jax.random.key_data(self.key)).tolist()}

  def set_state(self, state: dict) -> None:
    self.used = int(state["prompts_used"])
    self.key = jax.numpy.asarray(np.asarray(state["key"], np.uint32))

  def close(self) -> None:
    pass

  def metrics(self) -> dict:
    """The last step's sampling metrics (merged into the run's metrics row)."""
    return self.last

  def next(self, state) -> dict:
    begin = time.perf_counter()
    records = self._records(self.rl.prompts_per_step)
    self.key, sub = jax.random.split(self.key)
    ep = self.sample(state["trainable"], records, self.rl.group_size, sub,
                     self.rl.temperature)
    sampled = time.perf_counter()
    scores = self.score(ep)
    adv = losses.advantages(scores, self.rl.group_size, self.rl.normalize_std)
    constant = losses.constant_groups(scores, self.rl.group_size)
    keep = ~constant if self.rl.drop_constant_groups else np.ones_like(constant)
    batch = _place_whole(training_batch(ep, adv, keep), self.s.mesh)
    if self.reference is not None:
      batch["ref_logprobs"] = self._ref_logprobs(self.reference(state["trainable"]), batch)
    tokens = int(ep.lengths.sum())
    self.last = {
        "reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
        "correct": float(np.mean([self._correct(t, r) for t, r in zip(ep.texts, ep.records)]))
        if "answer" in records[0] else None,
        "completion_tokens": float(ep.lengths.mean()), "constant_groups": float(constant.mean()),
        "sample_s": sampled - begin, "sampled_tokens_per_s": tokens / (sampled - begin)}
    return batch

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
    shards = s.mesh.shape["data"] * s.mesh.shape["fsdp"]
    # Each prompt is prefilled once for its group, unless the prompts alone do not split
    # over the data shards (then every row is a prompt of its own).
    shared = group if len(records) % shards == 0 else 1
    ids = [self.prompt_ids(r) for r in records for _ in range(group // shared)]
    width = models.bucket(max(len(p) for p in ids), rl.bucket)
    limit = s.model_cfg.max_position_embeddings
    if width + rl.max_new_tokens > limit:
      raise ValueError(f"prompts of {width} tokens + rl.max_new_tokens={rl.max_new_tokens} "
                       f"exceed the model's {limit} positions")
    prompts, mask = left_pad(ids, width)
    placed = _place_whole({"t": prompts, "m": mask}, s.mesh)
    out = mesh_lib.traced_in(models.sample, s.mesh)(
        s.model, optim.model_params(trainable, s.frozen, s.plan), placed["t"], placed["m"],
        key, group=shared, max_new_tokens=rl.max_new_tokens, temperature=temperature,
        top_p=rl.top_p, eos_id=s.tok.eos_id, pad=s.tok.eos_id or 0)
    out = multihost.to_host(out)  # every process sees (and scores) every episode
    texts = [s.tok.decode(evaluate.until_eos(row[:n], s.tok.eos_id))
             for row, n in zip(out.tokens, out.lengths)]
    prompts, mask = (np.repeat(x, shared, axis=0) for x in (prompts, mask))
    return Episodes([r for r in records for _ in range(group)], prompts, mask,
                    np.asarray(out.tokens), np.asarray(out.logprobs),
                    np.asarray(out.lengths), texts)

  def score(self, ep: Episodes) -> np.ndarray:
    return np.asarray([
        rewards.score(self.reward_fn, self.rl.reward, r.get("prompt", ""), text,
                      {k: v for k, v in r.items() if k != "_index"}, r["_index"],
                      self.rl.format_reward)
        for text, r in zip(ep.texts, ep.records)], np.float64)

  @staticmethod
  def _correct(text: str, record: dict) -> bool:
    return rewards.correct(text, record["answer"])
