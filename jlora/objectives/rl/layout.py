"""RL's training batch: sampled episodes (``Episodes``) laid out for ``losses.policy_loss``,
per row or grouped (each prompt once, its group's completions after it:
``training_batch``, ``grouped``), and a batch widened to another's prompt width
(``widened``, for runs trained together). Host-side numpy only; ``rollouts`` samples and
scores the episodes.
"""

from __future__ import annotations

import dataclasses

import numpy as np


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


def training_batch(ep: Episodes, advantages: np.ndarray, keep: np.ndarray, group: int = 1
                   ) -> dict:
  """The ``losses.policy_loss`` batch (``lm.completion_logprobs`` reads either layout).

  ``group`` 1, per row: prompt + completion rows shifted by one (``inputs``/``targets``/
  ``positions``/``segment_ids`` [B, P + N - 1]); the per-token fields cover the
  completion only, the last N targets (target P - 1 + k is the completion's token k):
  ``mask`` [B, N] on its tokens through EOS (rows in ``keep``), ``sampler_logprobs``
  [B, N]; ``advantages`` [B].

  ``group`` S > 1, grouped (rows ``g * S ...`` one prompt's group, identical prompts): one
  row per prompt, the prompt once and then each completion's first N - 1 tokens
  (``inputs``/``positions``/``segment_ids`` [B / S, P + S (N - 1)]; the prompt's segment
  id -1, a prefix every completion sees, completion s's s + 1, positions continuing from
  the prompt's for each), and the per-row fields grouped: ``targets`` (the completions'
  tokens), ``mask``, ``sampler_logprobs`` [B / S, S, N], ``advantages`` [B / S, S]. Every
  field leads with the prompts, so shards and micro-batches split whole groups. Each
  prompt's forward and backward then run once for its group, not S times."""
  B, N = ep.tokens.shape
  completion = np.arange(N)[None, :] < ep.lengths[:, None]
  mask = (completion & keep[:, None]).astype(np.float32)
  sampler = np.where(completion, ep.logprobs, 0.0).astype(np.float32)
  advantages = advantages.astype(np.float32)
  if group > 1:
    G = B // group
    prompts, real = ep.prompts[::group], ep.prompt_mask[::group]
    body = ep.tokens[:, :N - 1].reshape(G, group * (N - 1))
    after = np.tile(np.arange(N - 1), group)[None, :] + real.sum(axis=1, keepdims=True)
    segments = np.repeat(np.arange(1, group + 1, dtype=np.int32), N - 1)
    return {"inputs": np.concatenate([prompts, body], axis=1),
            "positions": np.concatenate([np.maximum(np.cumsum(real, axis=1) - 1, 0), after],
                                        axis=1),
            "segment_ids": np.concatenate([-real.astype(np.int32),
                                           np.broadcast_to(segments, (G, len(segments)))],
                                          axis=1),
            "targets": ep.tokens.reshape(G, group, N), "mask": mask.reshape(G, group, N),
            "sampler_logprobs": sampler.reshape(G, group, N),
            "advantages": advantages.reshape(G, group)}
  seq = np.concatenate([ep.prompts, ep.tokens], axis=1)
  real = np.concatenate([ep.prompt_mask, np.ones_like(ep.tokens)], axis=1)
  positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "positions": positions[:, :-1],
          "segment_ids": real[:, :-1].astype(np.int32), "mask": mask,
          "sampler_logprobs": sampler, "advantages": advantages}


def grouped(ep: Episodes, group: int, divisor: int, model) -> int:
  """The group size ``training_batch`` may lay ``ep`` out by: ``group`` where each group's
  prompt rows are identical, the prompts split over ``divisor`` (data shards x
  micro-batches) and the model reads shared prefixes (``shared_prefix``: jlora's
  ``Transformer``); 1 (per row) otherwise."""
  B, P = ep.prompts.shape
  if group <= 1 or B % group or (B // group) % divisor or ep.tokens.shape[1] < 1 \
      or not getattr(model, "shared_prefix", False):
    return 1
  same = all(np.array_equal(x.reshape(-1, group, P), np.repeat(x[::group, None], group, 1))
             for x in (ep.prompts, ep.prompt_mask))
  return group if same else 1


def widened(batch: dict, width: int) -> dict:
  """A ``training_batch`` whose sequences are left-padded to ``width`` (padding: segment
  0, position 0, outside every row's attention): the same completion log-probs."""
  pad = width - batch["inputs"].shape[1]
  if pad == 0:
    return batch
  out = dict(batch)
  for k in ("inputs", "targets", "positions", "segment_ids"):
    if batch[k].ndim == 2:  # not the grouped layout's targets [G, S, N]
      out[k] = np.pad(batch[k], ((0, 0), (pad, 0)))
  return out
