"""Typed, frozen dataclasses from nested dicts (TOML recipes, JSON run configs), checked
field by field against their type hints: a value of the wrong type is an error naming the
key, an unknown key an error suggesting the nearest known one. ``--set KEY=VALUE``
overrides use TOML value syntax. The schema itself (``RunConfig`` and its sections) is
``jlora.run.config``'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from typing import Any, Union

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  import tomli as tomllib


def build(root, values: dict, prefix: str = ""):
  """``root`` (a dataclass) built from ``values``, every nested section checked; keys are
  named in errors under ``prefix`` (``"rl."`` for a section read on its own)."""
  if not isinstance(values, dict):
    raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a table of settings, "
                     f"got {values!r}")
  return _build(root, values, prefix, (root, prefix))


def read(path: str) -> dict:
  """The values of a TOML file (a ``.json`` one for a run directory's config), from a
  local path or a cloud-storage URL; one-line errors for a missing or malformed file."""
  from jlora.infra import fs
  try:
    raw = fs.path(path).read_bytes()  # a run directory may be on a cloud store
  except FileNotFoundError:
    raise ValueError(f"{path}: no such config file") from None
  except IsADirectoryError:
    raise ValueError(f"{path}: is a directory, not a config file") from None
  try:  # utf-8-sig: a byte-order mark (some editors write one) is not part of the text
    text = raw.decode("utf-8-sig")
    return json.loads(text) if path.endswith(".json") else tomllib.loads(text)
  except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'} "
                     f"({e})") from None


def _type_name(hint) -> str:
  return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint, key: str, root):
  origin = typing.get_origin(hint)
  if origin in (Union, types.UnionType):
    options = typing.get_args(hint)
    if value is None and type(None) in options:
      return None
    errors = []
    for option in options:
      if option is type(None):
        continue
      try:
        return _coerce(value, option, key, root)
      except ValueError as e:
        errors.append(e)
    raise errors[-1] if len(errors) == 1 else ValueError(
        f"{key}: {value!r} is not one of {' | '.join(_type_name(o) for o in options)}")
  if origin in (list, tuple):
    item = typing.get_args(hint)[0]
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
      raise ValueError(f"{key}: expected a list, got {value!r}")
    return list(_coerce(v, item, f"{key}[{i}]", root) for i, v in enumerate(value))
  if dataclasses.is_dataclass(hint):
    if isinstance(value, hint):
      return value
    if not isinstance(value, dict):
      raise ValueError(f"{key}: expected a table of settings, got {value!r}")
    return _build(hint, value, f"{key}.", root)
  if hint is bool:
    if not isinstance(value, bool):
      raise ValueError(f"{key}: expected true or false, got {value!r}")
    return value
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"{key}: expected an integer, got {value!r}")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{key}: expected a number, got {value!r}")
    return float(value)
  if hint is str:
    if not isinstance(value, str):
      raise ValueError(f"{key}: expected a string, got {value!r}")
    return value
  raise TypeError(f"unsupported config type {hint!r} for {key}")  # a jlora bug, not the user's


def _fields(cls) -> list[dataclasses.Field]:
  """The fields a config sets (not those marked ``metadata={"config": False}``)."""
  return [f for f in dataclasses.fields(cls) if f.metadata.get("config", True)]


def _all_keys(cls, prefix: str = "") -> list[str]:
  out = []
  for f in _fields(cls):
    hint = typing.get_type_hints(cls)[f.name]
    out.append(prefix + f.name)
    nested = [h for h in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(h)]
    if nested:
      out.extend(_all_keys(nested[0], f"{prefix}{f.name}."))
  return out


def _build(cls, values: dict, prefix: str, root):
  hints = typing.get_type_hints(cls)
  names = {f.name for f in _fields(cls)}
  for key in values:
    if key not in names:
      known = _all_keys(*root)
      near = difflib.get_close_matches(prefix + key, known, n=1, cutoff=0.6) or \
          difflib.get_close_matches(key, [k.rsplit(".", 1)[-1] for k in known], n=1)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      raise ValueError(f"unknown config key {prefix + key!r}{hint}")
  missing = [f.name for f in _fields(cls) if f.name not in values
             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ValueError(f"config is missing {', '.join(repr(prefix + m) for m in missing)}")
  kwargs = {k: _coerce(v, hints[k], prefix + k, root) for k, v in values.items()}
  try:
    return cls(**kwargs)
  except TypeError as e:  # pragma: no cover (defensive: dataclass signature drift)
    raise ValueError(f"{prefix or 'config'}: {e}") from None


def parse_value(text: str):
  """A ``--set`` value in TOML syntax; a bare word is a string."""
  try:
    return tomllib.loads(f"v = {text}")["v"]
  except tomllib.TOMLDecodeError:
    return text  # a bare word: a string


def apply_overrides(values: dict, overrides: list[str]) -> dict:
  """``["train.steps=50", "data.source=x.jsonl"]`` applied to a nested dict (copied)."""
  values = json.loads(json.dumps(values))
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=50")
    node = values
    *parents, leaf = key.strip().split(".")
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"--set {item!r}: {p!r} is not a table")
    node[leaf] = parse_value(text.strip())
  return values


def with_defaults(values: dict, defaults: dict) -> dict:
  """``defaults`` under ``values``: nested tables merged key by key, ``values`` winning."""
  out = dict(values)
  for key, value in defaults.items():
    if isinstance(value, dict) and isinstance(out.get(key, {}), dict):
      out[key] = with_defaults(out.get(key) or {}, value)
    else:
      out.setdefault(key, value)
  return out
