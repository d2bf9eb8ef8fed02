"""Preference pairs (``{prompt, chosen, rejected}``, TRL's format) -> the rows preference
tuning trains on (``jlora.objectives.dpo``).

Each pair is two rows of ``seq_len``: the prompt followed by the chosen completion, and
the prompt followed by the rejected one (``render.encode_pair``: the chat template as SFT
renders, the mask on the completion's own tokens), shifted into inputs/targets like SFT's
examples and right-padded (mask 0); no packing, so a row's positions are its own.

A pair longer than ``seq_len`` loses the start of its prompt (truncated from the left:
the completions are what is scored, so they are kept whole); a completion that does not
fit even so is a ValueError naming the record, never a silently shortened score.

Layout: a global batch of ``batch_size`` = P pairs is 2P rows in ``blocks`` consecutive
blocks, each the chosen rows of its P / blocks pairs then their rejected rows in the same
order. So the first half of a block's rows is chosen, the second half rejected, and the
same holds for each micro-batch ``train_step.make_step`` takes (row i -> micro-batch
i % k, with P divisible by k) at ``blocks=1``, and for each of a group's contiguous
micro-batches (``group.GroupBatches``) at ``blocks=k``: the loss pairs row j of a
micro-batch's first half with row j of its second half.
"""

from __future__ import annotations

import grain
import grain.experimental as grain_exp
import numpy as np

from jlora.data import render
from jlora.data.pipeline import (DataConfig, Stats, _shard, _where, open_source, order_seed,
                                 sample, scale_up)
from jlora.data.tokenizer import Tokenizer

FIELDS = ("inputs", "targets", "mask")


def _row(ids: np.ndarray, mask: np.ndarray, seq_len: int, what: str) -> dict:
  """One completion's row: shifted, its prompt cut from the left to fit, padded."""
  inputs, targets, mask = ids[:-1], ids[1:], mask[1:]
  cut = len(inputs) - seq_len
  if cut > 0:
    if mask[:cut].any():
      raise ValueError(f"{what}: {int(mask.sum())} completion tokens do not fit "
                       f"data.seq_len={seq_len} even with the prompt cut from the left "
                       f"(raise data.seq_len)")
    inputs, targets, mask = inputs[cut:], targets[cut:], mask[cut:]
  pad = seq_len - len(inputs)
  row = {k: np.pad(v, (0, pad)).astype(np.int32)
         for k, v in (("inputs", inputs), ("targets", targets), ("mask", mask))}
  return {**row, "length": len(inputs), "cut": max(cut, 0)}


def encode(record: dict, tok: Tokenizer, cfg: DataConfig, where: str = "record"
           ) -> tuple[dict, dict]:
  """A pair's (chosen row, rejected row) of ``cfg.seq_len`` (module docstring); besides
  the ``FIELDS`` arrays each says its tokens (``length``) and how many prompt tokens were
  cut from its left (``cut``)."""
  try:
    pair = render.encode_pair(record, tok, cfg.fields, cfg.chat, cfg.system)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return tuple(_row(ids, mask, cfg.seq_len, f"{where} ({name})")
               for (ids, mask), name in zip(pair, render.PAIR_FIELDS))


def layout(pairs: int, blocks: int) -> np.ndarray:
  """[2 * pairs, 2] (pair, side) of each global row: ``blocks`` blocks, each its pairs'
  chosen rows (side 0) then their rejected rows (side 1)."""
  if pairs % blocks:
    raise ValueError(f"{pairs} pairs do not split into {blocks} blocks")
  per = pairs // blocks
  out = [(b * per + j, side) for b in range(blocks) for side in (0, 1) for j in range(per)]
  return np.asarray(out, np.int64)


class _Batch:
  """Indices of a batch's pairs -> this process's rows of it (padding pairs: mask 0)."""

  def __init__(self, source, tok: Tokenizer, cfg: DataConfig, rows: np.ndarray):
    self.source, self.tok, self.cfg, self.rows = source, tok, cfg, rows
    self.where = _where(source)

  def __call__(self, indices) -> dict:
    indices = [int(i) for i in np.atleast_1d(indices)]
    needed = sorted({int(p) for p, _ in self.rows})
    encoded = {p: encode(self.source[indices[p]], self.tok, self.cfg, self.where(indices[p]))
               for p in needed if p < len(indices)}
    out = []
    for p, side in self.rows:
      if int(p) in encoded:
        out.append(encoded[int(p)][side])
      else:  # a short last batch (finite epochs): a pair of weight 0
        like = next(iter(encoded.values()))[side]
        out.append({**like, "mask": np.zeros_like(like["mask"])})
    return {k: np.stack([r[k] for r in out]) for k in FIELDS}


def dataset(cfg: DataConfig, tok: Tokenizer, *, blocks: int = 1,
            process_index: int | None = None, process_count: int | None = None,
            drop_remainder: bool = True, source=None) -> grain.IterDataset:
  """This process's rows of each global batch of ``cfg.batch_size`` pairs (2 x that many
  rows in all, laid out as ``layout(batch_size, blocks)``): the pairs in a seeded order
  shuffled anew each epoch (``pipeline.order_seed``), each process encoding only the
  pairs its rows hold. ``drop_remainder=False`` (finite epochs): the last batch's missing
  pairs are rows of weight 0. Its iterator's ``get_state()`` round-trips to the exact next
  batch."""
  index, count = _shard(process_index, process_count)
  rows = 2 * cfg.batch_size
  if rows % count:
    raise ValueError(f"2 x data.batch_size={cfg.batch_size} rows do not split over "
                     f"{count} processes")
  source = source if source is not None else open_source(cfg)
  mine = layout(cfg.batch_size, blocks)[index * rows // count:(index + 1) * rows // count]
  ds = grain.MapDataset.range(len(source))
  if cfg.shuffle:
    ds = ds.seed(order_seed(cfg)).shuffle()
  ds = ds.repeat(cfg.epochs).batch(cfg.batch_size, drop_remainder=drop_remainder)
  it = ds.map(_Batch(source, tok, cfg, mine)).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if cfg.prefetch:
    it = grain_exp.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch)
  return it


def stats(cfg: DataConfig, tok: Tokenizer, *, limit: int | None = None, source=None) -> Stats:
  """Counts over one epoch of pairs (of ``limit`` evenly spaced records, scaled up, when
  given), encoding each: a record missing a field, or a completion that cannot fit, is a
  ValueError naming it. Information: at most 1 bit a pair (which completion is
  preferred)."""
  source = source if source is not None else open_source(cfg)
  where, n = _where(source), len(source)
  picks = sample(n, limit)
  out = Stats(sampled=len(picks))
  for i in picks:
    rows = encode(source[int(i)], tok, cfg, where(int(i)))
    out.truncated += any(r["cut"] for r in rows)
    out.tokens += sum(r["length"] for r in rows)
    out.trainable_tokens += sum(int(r["mask"].sum()) for r in rows)
    out.longest = max(out.longest, *(r["length"] + r["cut"] for r in rows))
    out.examples += 1
  scale_up(out, n)
  out.info_bits, out.info_basis = float(n), "at most 1 bit per preference pair"
  return out
