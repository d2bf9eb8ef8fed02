"""Turn local files into a TFDS dataset stored as ArrayRecord (``jlora data build``).

A ``GeneratorBasedBuilder`` whose features are inferred from the records (strings -> Text,
ints/floats -> Scalar, lists of {str: str} such as chat messages -> Sequence of Text dicts).
The result is read back by ``tfds.builder_from_directory(...).as_data_source(split)``, or by
giving its directory as a data source; TensorFlow is never needed.
"""

from __future__ import annotations

import os
import re

import numpy as np

from jlora.data import sources


def _feature(name: str, value):
  import tensorflow_datasets as tfds
  if isinstance(value, str):
    return tfds.features.Text()
  if isinstance(value, bool) or isinstance(value, int):
    return tfds.features.Scalar(np.int64)
  if isinstance(value, float):
    return tfds.features.Scalar(np.float32)
  if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
    return tfds.features.Sequence(tfds.features.Text())
  if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
    keys = sorted(value[0])
    if all(sorted(v) == keys and all(isinstance(x, str) for x in v.values()) for v in value):
      return tfds.features.Sequence({k: tfds.features.Text() for k in keys})
  raise ValueError(f"field {name!r}: cannot store {type(value).__name__} values {value!r:.60} "
                   "(supported: strings, numbers, lists of strings, lists of string dicts)")


def _schema(record: dict) -> dict:
  return {k: _feature(k, v) for k, v in sorted(record.items())}


def _kinds(record: dict) -> dict:
  return {k: type(v).__name__ if not isinstance(v, list) else "list" for k, v in record.items()}


def build(splits: dict[str, str], out_dir: str, name: str, *, separator: str = "\n\n") -> str:
  """Build ``name`` from ``{split: source path}`` into ``out_dir``; returns the prepared
  dataset directory (``out_dir/name/1.0.0``), which works as a data source."""
  import tensorflow_datasets as tfds
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"dataset name {name!r} must be lower_snake_case (a-z, 0-9, _)")
  if not splits:
    raise ValueError("no splits to build")
  opened = {}
  for split, path in splits.items():
    if path.startswith(("tfds:", "task:")) or (os.path.isdir(path) and sources.is_tfds_dir(path)):
      raise ValueError(f"split {split}: build reads local files, not {path!r}")
    src = sources.open_source(path, separator=separator)
    if len(src) == 0:
      raise ValueError(f"split {split}: {path} is empty")
    opened[split] = src
  first = next(iter(opened.values()))[0]
  features, kinds = _schema(first), _kinds(first)

  def generate(split, src):
    for i in range(len(src)):
      record = src[i]
      if _kinds(record) != kinds:
        where = getattr(src, "where", lambda j: f"record {j}")(i)
        raise ValueError(f"split {split}, {where}: fields {_kinds(record)} differ from the "
                         f"first record's {kinds}")
      yield i, record

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self,
                                   features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split, src) for split, src in opened.items()}

    def _generate_examples(self, split, src):
      yield from generate(split, src)

  builder_cls = type(name.title().replace("_", ""), (Builder,), {"name": name},
                     skip_registration=True)
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"{out_dir}: cannot create the output directory ({e.strerror})") from None
  builder = builder_cls(data_dir=out_dir, file_format="array_record")
  builder.download_and_prepare()
  return str(builder.data_dir)
