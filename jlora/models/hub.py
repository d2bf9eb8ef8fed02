"""Hugging Face Hub ids wherever jlora takes a model or adapter path.

``resolve("org/name")`` (optionally ``"org/name@revision"``) returns a local snapshot
directory through ``huggingface_hub.snapshot_download``: the Hub's own cache (``HF_HOME``
/ ``HF_HUB_CACHE``), token and offline mode (``HF_HUB_OFFLINE=1``) apply, and only the
files jlora reads are fetched. A local path that exists always wins over an id; anything
else is returned as given, for the caller's own "does not exist" error.
"""

from __future__ import annotations

import os
import re

# What jlora reads from a model repository and from an adapter repository.
MODEL_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "chat_template.jinja"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(path: str) -> bool:
  """``org/name`` or ``org/name@revision`` that is not an existing local path."""
  return not os.path.exists(path) and bool(_ID.match(path)) and not path.startswith(".")


def resolve(path: str, adapter: bool = False) -> str:
  """A local directory for ``path``: itself if it exists or is not a Hub id, else the
  Hub snapshot (model files, or ``adapter``'s) from the cache or the Hub."""
  if not is_hub_id(path):
    return path
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                      LocalEntryNotFoundError, RepositoryNotFoundError,
                                      RevisionNotFoundError)
  repo, _, revision = path.partition("@")
  what = "adapter" if adapter else "model"
  try:
    return snapshot_download(repo, revision=revision or None,
                             allow_patterns=ADAPTER_FILES if adapter else MODEL_FILES)
  except GatedRepoError:
    raise ValueError(f"{what} {path!r} is gated on the Hugging Face Hub: accept its terms "
                     "and set HF_TOKEN") from None
  except RevisionNotFoundError:
    raise ValueError(f"{what} {path!r}: no revision {revision!r} on the Hugging Face Hub"
                     ) from None
  except RepositoryNotFoundError:
    raise ValueError(f"{what} {path!r} is neither a local path nor a Hugging Face Hub "
                     "repository (a typo, or private: set HF_TOKEN)") from None
  except LocalEntryNotFoundError:
    raise ValueError(f"{what} {path!r} is neither a local path nor in the Hugging Face "
                     f"cache ({_cache()}), and the Hub is not reachable"
                     f"{' (HF_HUB_OFFLINE is set)' if _offline() else ''}") from None
  except (HfHubHTTPError, HFValidationError, OSError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{what} {path!r}: Hugging Face Hub error: {first}") from None


SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the smollm2 alias's GGUF was made from
_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})(/|$)")


def base_name(path: str) -> tuple[str, str | None]:
  """(name, revision) a PEFT adapter should record as its base so that it loads wherever
  that base is reachable: the Hub id for the smollm2 alias, a Hub id as given, a Hub
  cache snapshot's own id and commit; else the absolute local path (revision None)."""
  if path == "smollm2":
    return SMOLLM2_ID, None
  if is_hub_id(path):
    repo, _, revision = path.partition("@")
    return repo, revision or None
  if match := _SNAPSHOT.search(os.path.realpath(path)):
    return f"{match.group(1)}/{match.group(2)}", match.group(3)
  return os.path.abspath(path), None


def _cache() -> str:
  from huggingface_hub import constants
  return constants.HF_HUB_CACHE


def _offline() -> bool:
  from huggingface_hub import constants
  return constants.is_offline_mode()
