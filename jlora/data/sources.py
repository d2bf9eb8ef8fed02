"""Random-access record sources (grain's ``RandomAccessDataSource`` protocol: ``len`` and
``[i]``), each record a dict: local JSONL (a file or a directory of them), Parquet, a
plain-text corpus split into documents, a TFDS dataset built on disk (ArrayRecord), and the
built-in generated tasks. ``open_source(spec)`` picks one from a path or ``tfds:``/``task:``
name. Nothing here downloads."""

from __future__ import annotations

import glob
import json
import os
import threading

import numpy as np

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _files(path: str, suffixes: tuple[str, ...]) -> list[str]:
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if f.endswith(suffixes) and os.path.isfile(f))
    if not files:
      raise ValueError(f"{path}: no {'/'.join(suffixes)} files in this directory")
    return files
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file or directory")
  return [path]


class JsonlSource:
  """JSON-lines records. Every line is parsed once when the source opens, so a malformed
  line fails before training with its file and line number; only (file, offset, length)
  triples are kept, and records are read back with ``os.pread`` (thread-safe)."""

  def __init__(self, path: str):
    self.files = _files(path, JSON_SUFFIXES)
    index = []
    for f, file in enumerate(self.files):
      offset = 0
      with open(file, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
          if line.strip():
            try:
              record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
              raise ValueError(f"{file}:{lineno}: malformed JSON line ({e})") from None
            if not isinstance(record, dict):
              raise ValueError(f"{file}:{lineno}: expected a JSON object, "
                               f"got {type(record).__name__}")
            index.append((f, offset, len(line), lineno))
          offset += len(line)
    self._index = np.asarray(index, np.int64).reshape(-1, 4)
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._index)

  def _fd(self, f: int) -> int:
    with self._lock:
      if f not in self._fds:
        self._fds[f] = os.open(self.files[f], os.O_RDONLY)
      return self._fds[f]

  def __getitem__(self, i: int) -> dict:
    f, offset, length, _ = (int(v) for v in self._index[i])
    return json.loads(os.pread(self._fd(f), length, offset))

  def where(self, i: int) -> str:
    """``file:line`` of record ``i`` (for error messages)."""
    f, _, _, lineno = (int(v) for v in self._index[i])
    return f"{self.files[f]}:{lineno}"

  def __getstate__(self):  # file descriptors do not travel to grain worker processes
    state = dict(self.__dict__)
    state["_fds"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"JsonlSource({len(self.files)} files, {len(self)} records)"


class ParquetSource:
  """Parquet rows as dicts (pyarrow; the table is memory-mapped, rows converted on access)."""

  def __init__(self, path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    self.files = _files(path, (".parquet",))
    try:
      self._table = pa.concat_tables([pq.read_table(f, memory_map=True) for f in self.files])
    except (pa.ArrowInvalid, OSError) as e:
      raise ValueError(f"{path}: cannot read Parquet ({e})") from None

  def __len__(self) -> int:
    return self._table.num_rows

  def __getitem__(self, i: int) -> dict:
    return self._table.slice(int(i), 1).to_pylist()[0]


class TextSource:
  """A plain-text corpus: every file is split into documents at ``separator`` (e.g.
  ``"\\n%\\n"`` for the fortunes files, ``"\\n\\n"`` for paragraphs); empty documents are
  dropped. Records are ``{"text": document}``."""

  def __init__(self, path: str, separator: str = "\n\n"):
    if not separator:
      raise ValueError("text separator must be a non-empty string")
    self.files = _files(path, ("",))
    docs = []
    for file in self.files:
      try:
        with open(file, encoding="utf-8") as fh:
          text = fh.read()
      except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e})") from None
      docs.extend(d.strip() for d in text.split(separator) if d.strip())
    self._docs = docs

  def __len__(self) -> int:
    return len(self._docs)

  def __getitem__(self, i: int) -> dict:
    return {"text": self._docs[i]}


class TfdsSource:
  """A TFDS dataset prepared on disk (ArrayRecord), read without TensorFlow. ``path`` is a
  prepared dataset directory (the one holding ``dataset_info.json``) or a dataset name
  looked up under ``data_dir``."""

  def __init__(self, path: str, split: str = "train", data_dir: str | None = None):
    import tensorflow_datasets as tfds
    try:
      if os.path.isdir(path):
        self._source = tfds.builder_from_directory(path).as_data_source(split=split)
      else:
        self._source = tfds.data_source(path, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001  tfds raises many types for "not there"
      raise ValueError(f"TFDS dataset {path!r} (split {split!r}) cannot be opened: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    return _from_tfds(self._source[int(i)])


def _from_tfds(value):
  """TFDS numpy records -> plain Python: bytes -> str, a sequence of dicts (stored as a
  dict of arrays) -> a list of dicts."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    out = {k: _from_tfds(v) for k, v in value.items()}
    columns = [v for v in out.values() if isinstance(v, list)]
    if columns and len(columns) == len(out) and len({len(c) for c in columns}) == 1:
      keys = list(out)
      return [dict(zip(keys, row)) for row in zip(*out.values())]
    return out
  if isinstance(value, list):
    return [_from_tfds(v) for v in value]
  if isinstance(value, np.ndarray):
    if value.dtype == object or value.dtype.kind == "S":
      return [_from_tfds(v) for v in value.tolist()]
    return value.item() if value.ndim == 0 else value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def is_tfds_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "dataset_info.json"))


def open_source(spec: str, *, split: str = "train", separator: str = "\n\n",
                data_dir: str | None = None, seed: int = 0, size: int | None = None):
  """A record source from ``spec``:

  - ``task:NAME`` a built-in generated task (``jlora.data.tasks``), ``size`` records;
  - ``tfds:NAME`` a TFDS dataset already prepared under ``data_dir``;
  - a prepared TFDS directory (has ``dataset_info.json``);
  - ``*.jsonl``/``*.json``/``*.ndjson`` file or a directory of them;
  - ``*.parquet`` file or a directory of them;
  - any other file or directory: plain text split at ``separator``.
  """
  if spec.startswith("task:"):
    from jlora.data import tasks
    return tasks.source(spec[5:], split=split, seed=seed, size=size)
  if spec.startswith("tfds:"):
    return TfdsSource(spec[5:], split=split, data_dir=data_dir)
  if not os.path.exists(spec):
    raise ValueError(f"{spec}: no such file or directory")
  if os.path.isdir(spec):
    if is_tfds_dir(spec):
      return TfdsSource(spec, split=split)
    names = [f for f in glob.glob(os.path.join(spec, "**", "*"), recursive=True)]
    if any(f.endswith(JSON_SUFFIXES) for f in names):
      return JsonlSource(spec)
    if any(f.endswith(".parquet") for f in names):
      return ParquetSource(spec)
    return TextSource(spec, separator)
  if spec.endswith(JSON_SUFFIXES):
    return JsonlSource(spec)
  if spec.endswith(".parquet"):
    return ParquetSource(spec)
  return TextSource(spec, separator)
