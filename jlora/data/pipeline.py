"""The grain input pipeline: source -> encode (ids + loss mask, shifted into inputs/targets)
-> seeded shuffle, reshuffled every epoch -> one row stream per row of the global batch
(this process's rows only) -> first-fit packing into fixed-length rows with segment ids
and positions -> batches -> thread prefetch.

Batches are numpy dicts ``{"inputs", "targets", "mask"}`` of ``[local_batch, seq_len]``
int32, plus ``"segment_ids"``/``"positions"`` when packed (0 marks padding): exactly what
``jlora.run.train_step.make_step`` takes. The iterator's ``get_state()``/``set_state()`` round-trips
to the exact next batch (grain's own iterator state, small JSON-able dict), so checkpoints
carry it.

Examples are shifted *before* packing (inputs ``ids[:-1]``, targets ``ids[1:]``), so no
target ever crosses into the next packed document.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import grain.experimental as grain_exp
import numpy as np

from jlora.data import render, sources
from jlora.data.tokenizer import Tokenizer

OVERFLOW = ("truncate", "drop")
PACKING_BINS = 4  # first-fit bins per row stream (data.packing_bins), whatever the topology


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to cut it. ``source``: a path, ``tfds:NAME`` or ``task:NAME``
  (see ``sources.open_source``); ``batch_size`` is global (rows per step over all
  processes); ``overflow``: what to do with an example longer than ``seq_len`` tokens."""
  source: str
  format: str = "auto"
  fields: render.Fields = render.Fields()
  chat: bool = True
  system: str | None = None  # system message for chats without one (chat rendering only)
  split: str = "train"
  seq_len: int = 256
  batch_size: int = 8
  pack: bool = True
  overflow: str = "truncate"
  shuffle: bool = True
  seed: int = 0  # a task: source's content (its records), and by default the order
  shuffle_seed: int | None = None  # the order alone (example shuffle, packing); None: seed
  epochs: int | None = None  # None: repeat forever (the trainer counts steps)
  separator: str = "\n\n"
  data_dir: str | None = None
  size: int | None = None  # records of a task: source
  packing_bins: int | None = None  # first-fit bins of each row stream; default PACKING_BINS
  row_streams: int | None = None  # streams the batch's rows come from; default batch_size
  prefetch: int = 2  # batches prefetched by a background thread; 0 turns it off

  def __post_init__(self):
    if not self.source:
      raise ValueError("data.source is empty")
    if self.format not in render.FORMATS:
      raise ValueError(f"data.format {self.format!r} is not one of {', '.join(render.FORMATS)}")
    if self.overflow not in OVERFLOW:
      raise ValueError(f"data.overflow {self.overflow!r} is not one of {', '.join(OVERFLOW)}")
    for name in ("seq_len", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
    if self.epochs is not None and self.epochs < 1:
      raise ValueError(f"data.epochs must be >= 1 or None, got {self.epochs}")
    if self.prefetch < 0:
      raise ValueError(f"data.prefetch must be >= 0, got {self.prefetch}")
    if self.row_streams is not None and (self.row_streams < 1 or
                                         self.batch_size % self.row_streams):
      raise ValueError(f"data.row_streams={self.row_streams} must divide "
                       f"data.batch_size={self.batch_size}")


class _Encode:
  """record -> shifted example, or None when it has nothing to train on / is dropped."""

  def __init__(self, cfg: DataConfig, tok: Tokenizer, where):
    self.cfg, self.tok, self.where = cfg, tok, where

  def full(self, index: int, record: dict) -> tuple[np.ndarray, np.ndarray]:
    try:
      return render.encode(record, self.tok, self.cfg.format, self.cfg.fields, self.cfg.chat,
                           self.cfg.system)
    except ValueError as e:
      raise ValueError(f"{self.where(index)}: {e}") from None

  def __call__(self, index: int, record: dict) -> dict | None:
    ids, mask = self.full(index, record)
    if len(ids) < 2 or not mask[1:].any():
      return None
    n = len(ids) - 1
    if n > self.cfg.seq_len:
      if self.cfg.overflow == "drop":
        return None
      n = self.cfg.seq_len
    return {"inputs": ids[:n], "targets": ids[1:n + 1], "mask": mask[1:n + 1]}


def _where(source):
  locate = getattr(source, "where", None)
  return locate if callable(locate) else (lambda i: f"record {i}")


def order_seed(cfg: DataConfig) -> int:
  """The seed of the data's order (the example shuffle, packing, RL's prompt order):
  ``data.shuffle_seed``, else ``data.seed``. Apart from ``data.seed`` because a ``task:``
  source's records come from ``data.seed``: a study's seeds vary the order and keep the
  records and the held-out set (``jlora study --seeds``)."""
  return cfg.seed if cfg.shuffle_seed is None else cfg.shuffle_seed


def open_source(cfg: DataConfig):
  source = sources.open_source(cfg.source, split=cfg.split, separator=cfg.separator,
                               data_dir=cfg.data_dir, seed=cfg.seed, size=cfg.size)
  if len(source) == 0:
    raise ValueError(f"{cfg.source}: empty dataset (split {cfg.split!r})")
  return source


def examples(cfg: DataConfig, tok: Tokenizer, source=None) -> grain.MapDataset:
  """Encoded, shifted examples in source order; dropped ones are None (filtered)."""
  source = source if source is not None else open_source(cfg)
  return grain.MapDataset.source(source).map_with_index(_Encode(cfg, tok, _where(source)))


def _shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process index {process_index} is outside 0..{process_count - 1}")
  return process_index, process_count


def _pad(example: dict, length: int) -> dict:
  return {k: np.pad(v, (0, length - len(v))).astype(np.int32) for k, v in example.items()}


def _rename_packed(row: dict) -> dict:
  return {"inputs": row["inputs"].astype(np.int32), "targets": row["targets"].astype(np.int32),
          "mask": row["mask"].astype(np.int32),
          "segment_ids": row["inputs_segment_ids"].astype(np.int32),
          "positions": row["inputs_positions"].astype(np.int32)}


def dataset(cfg: DataConfig, tok: Tokenizer, *, process_index: int | None = None,
            process_count: int | None = None, drop_remainder: bool = True,
            source=None) -> grain.IterDataset:
  """This process's rows of each global batch (``batch_size / process_count`` of them).

  The global batch does not depend on how many processes assemble it. There are G =
  ``row_streams`` streams (default: one per row, G = B = ``batch_size``); stream j takes
  examples j, j + G, j + 2G, ... of the one seeded, shuffled example order, packs them on
  its own (first-fit over ``packing_bins`` bins) and gives B/G consecutive rows of every
  batch. Process p of P reads, encodes and packs only the streams of its rows [p B/P,
  (p+1) B/P) (the rows its devices get, ``mesh.global_batch``): with G = B, 1/P of the
  data. The iterator state is keyed by stream.

  ``drop_remainder=False`` (finite epochs): a stream that runs out yields padding rows
  (mask 0) until every stream has; by default the batches end with the first.
  """
  index, count = _shard(process_index, process_count)
  if cfg.batch_size % count:
    raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the "
                     f"{count} processes")
  local_batch = cfg.batch_size // count
  ds = examples(cfg, tok, source)
  _check_some_fit(ds, cfg)
  ds = ds.filter(lambda x: x is not None)
  if cfg.shuffle:
    ds = ds.seed(order_seed(cfg)).shuffle()
  ds = ds.repeat(cfg.epochs)  # shuffled anew each epoch
  n_streams = cfg.row_streams or cfg.batch_size
  per = cfg.batch_size // n_streams  # consecutive rows of a batch from one stream
  first = index * local_batch  # this process's rows: [first, first + local_batch)
  mine = range(first // per, (first + local_batch - 1) // per + 1)
  streams = {j: _stream(ds[j::n_streams], cfg) for j in mine}
  it = _Rows(streams, per, first - mine[0] * per, local_batch, drop_remainder)
  if cfg.prefetch:
    it = grain_exp.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch)
  return it


def random_tokens(vocab_size: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
  """``[batch, seq + 1]`` int32 ids drawn uniformly from ``[0, vocab_size)``, the same for
  the same seed: text for measurements that need only shapes (``lm_batch`` shifts it)."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab_size, (batch, seq + 1)).astype(np.int32)


def lm_batch(tokens) -> dict:
  """``tokens [B, T + 1]`` as an unpacked batch of ``dataset``'s kind: inputs ``[:, :-1]``,
  targets ``[:, 1:]``, every target in the loss (mask 1, int32)."""
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "mask": np.ones((tokens.shape[0], tokens.shape[1] - 1), np.int32)}


def _stream(ds: grain.MapDataset, cfg: DataConfig) -> grain.IterDataset:
  """One row stream: its examples packed (or padded) into rows of ``seq_len``."""
  if len(ds) == 0:
    raise ValueError(f"{cfg.source}: fewer examples than data.batch_size={cfg.batch_size} "
                     "rows to fill")
  # read in the consuming thread: the batch-level prefetch thread does the work
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if not cfg.pack:
    return it.map(lambda x: _pad(x, cfg.seq_len))
  lengths = {k: cfg.seq_len for k in ("inputs", "targets", "mask")}
  return grain_exp.FirstFitPackIterDataset(
      it, length_struct=lengths, num_packing_bins=cfg.packing_bins or PACKING_BINS,
      seed=order_seed(cfg), shuffle_bins=cfg.shuffle).map(_rename_packed)


class _Rows(grain.IterDataset):
  """Row streams -> batches: each batch takes ``per`` rows from every stream (in stream
  order) and keeps ``count`` of them from ``offset`` (a stream shared with another
  process gives it the rest)."""

  def __init__(self, streams: dict[int, grain.IterDataset], per: int, offset: int,
               count: int, drop_remainder: bool):
    super().__init__(list(streams.values()))
    self._args = (list(streams), per, offset, count, drop_remainder)

  def __iter__(self) -> "_RowsIterator":
    return _RowsIterator([iter(p) for p in self.parents], *self._args)


class _RowsIterator(grain.DatasetIterator):

  def __init__(self, parents, ids: list[int], per: int, offset: int, count: int,
               drop_remainder: bool):
    super().__init__(parents)
    self._ids, self._per, self._offset, self._count = ids, per, offset, count
    self._drop = drop_remainder
    self._done = [False] * len(parents)

  def _row(self, i: int):
    if self._done[i]:
      return None
    try:
      return next(self._parents[i])
    except StopIteration:
      if self._drop:
        raise
      self._done[i] = True
      return None

  def __next__(self) -> dict:
    rows = [self._row(i) for i in range(len(self._parents)) for _ in range(self._per)]
    if all(self._done):
      raise StopIteration
    rows = rows[self._offset:self._offset + self._count]
    like = next(r for r in rows if r is not None)  # padding rows (mask 0) for spent streams
    return {k: np.stack([r[k] if r is not None else np.zeros_like(like[k]) for r in rows])
            for k in like}

  def get_state(self) -> dict:
    return {"rows": {str(j): p.get_state() for j, p in zip(self._ids, self._parents)},
            "done": [str(j) for j, d in zip(self._ids, self._done) if d]}

  def set_state(self, state: dict) -> None:
    for j, parent in zip(self._ids, self._parents):
      parent.set_state(state["rows"][str(j)])
    self._done = [str(j) in state.get("done", ()) for j in self._ids]


def _check_some_fit(ds: grain.MapDataset, cfg: DataConfig, probe: int = 256) -> None:
  """An endless pipeline over examples that are all dropped would spin forever: fail fast
  when none of the first ``probe`` records yields an example."""
  n = min(len(ds), probe)
  if n and all(ds[i] is None for i in range(n)):
    why = (f"longer than seq_len={cfg.seq_len} (overflow=drop)" if cfg.overflow == "drop"
           else "without a trainable token")
    raise ValueError(f"{cfg.source}: the first {n} records are all {why}")


@dataclasses.dataclass
class Stats:
  """What the advisor and the run summary need to know about a dataset."""
  examples: int = 0
  tokens: int = 0  # input tokens per epoch after truncation/drop
  trainable_tokens: int = 0  # tokens with loss mask 1
  truncated: int = 0
  dropped: int = 0  # too long (overflow=drop) or nothing to train on
  longest: int = 0  # longest example before truncation, in tokens
  info_bits: float = 0.0
  info_basis: str = ""
  sampled: int = 0  # records actually encoded (all of them unless ``limit`` was given)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    return (f"{self.examples} examples, {self.tokens} tokens ({self.trainable_tokens} "
            f"trained), {self.truncated} truncated, {self.dropped} dropped, longest "
            f"{self.longest}; information ~{self.info_bits:.3g} bits ({self.info_basis})")


def sample(n: int, limit: int | None) -> np.ndarray:
  """The record indices ``stats`` reads: all ``n``, or ``limit`` evenly spaced ones."""
  return (np.arange(n) if limit is None or limit >= n else
          np.unique(np.linspace(0, n - 1, limit).astype(np.int64)))


def scale_up(out: Stats, n: int) -> None:
  """Counts over ``out.sampled`` records scaled to all ``n`` (in place)."""
  for name in ("examples", "tokens", "trainable_tokens", "truncated", "dropped"):
    setattr(out, name, int(round(getattr(out, name) * n / out.sampled)))


def stats(cfg: DataConfig, tok: Tokenizer, *, limit: int | None = None,
          first_epoch_loss: float | None = None, source=None) -> Stats:
  """Counts over one epoch (of ``limit`` evenly spaced records, scaled up, when given).

  Information content (FINDINGS 5): exact for a task that knows it (``facts``); otherwise
  trainable tokens x bits per token, where bits per token is the measured first-epoch loss
  (nats, converted) when given, else 1 bit/token, the typical value for SFT text.
  """
  source = source if source is not None else open_source(cfg)
  encode = _Encode(cfg, tok, _where(source))
  n = len(source)
  picks = sample(n, limit)
  out = Stats(sampled=len(picks))
  for i in picks:
    ids, mask = encode.full(int(i), source[int(i)])
    targets = len(ids) - 1
    out.longest = max(out.longest, targets)
    if targets < 1 or not mask[1:].any() or (targets > cfg.seq_len and cfg.overflow == "drop"):
      out.dropped += 1
      continue
    if targets > cfg.seq_len:
      out.truncated += 1
    kept = min(targets, cfg.seq_len)
    out.examples += 1
    out.tokens += kept
    out.trainable_tokens += int(mask[1:kept + 1].sum())
  scale_up(out, n)
  task = getattr(source, "task", None)
  if task is not None and task.exact_info:
    out.info_bits, out.info_basis = source.info_bits, f"exact: {task.name} answers"
  elif first_epoch_loss is not None:
    bits = first_epoch_loss / math.log(2)
    out.info_bits = out.trainable_tokens * bits
    out.info_basis = f"trained tokens x {bits:.3g} bits/token (measured first-epoch loss)"
  else:
    out.info_bits = float(out.trainable_tokens)
    out.info_basis = "trained tokens x 1 bit/token (SFT text estimate)"
  return out
