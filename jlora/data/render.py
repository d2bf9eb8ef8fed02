"""Records -> token ids and a per-token loss mask.

Three formats (``"auto"`` picks by the fields present):

- ``text``: language modelling, every token trained (EOS appended when the tokenizer has one).
- ``completion``: ``prompt`` + ``completion``; only completion tokens (and EOS) are trained.
  With ``chat=True`` and a chat template the pair is rendered as a user turn and an
  assistant turn instead (what an instruct model expects).
- ``messages``: a chat, rendered with the model's own chat template (Jinja, sandboxed as
  transformers does); only assistant turns are trained.

``mask[j] == 1`` means token ``j`` is a training target. Assistant spans are found by
rendering prefixes of the conversation: the span of assistant turn ``i`` runs from the end of
``messages[:i]`` rendered with the generation prompt to the end of ``messages[:i + 1]``.
Tokens are then marked by their character offsets, so the ids are exactly those of the
whole rendered string (no per-piece tokenisation seams).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jlora.data.tokenizer import Tokenizer

FORMATS = ("auto", "text", "completion", "messages")


@dataclasses.dataclass(frozen=True)
class Fields:
  """Record field names for each format."""
  text: str = "text"
  prompt: str = "prompt"
  completion: str = "completion"
  messages: str = "messages"


@functools.lru_cache(maxsize=8)
def _compile(template: str):
  from jinja2.exceptions import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template)


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
  if not tok.chat_template:
    raise ValueError("the tokenizer has no chat template; messages need one "
                     "(or use the completion format with chat=False)")
  special = {"bos_token": tok.tok.id_to_token(tok.bos_id) if tok.bos_id is not None else "",
             "eos_token": tok.tok.id_to_token(tok.eos_id) if tok.eos_id is not None else ""}
  return _compile(tok.chat_template).render(messages=messages,
                                            add_generation_prompt=add_generation_prompt,
                                            **special)


def _check_messages(messages) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise ValueError("messages must be a non-empty list of {role, content} objects")
  for m in messages:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
        or not isinstance(m.get("content"), str):
      raise ValueError(f"bad chat message {m!r}: need string 'role' and 'content'")
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError("chat has no assistant turn: nothing to train on")
  return messages


def encode_chat(tok: Tokenizer, messages: list[dict], trained_from: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """``(ids, mask)`` of a chat: the mask on its assistant turns from message
  ``trained_from`` on (a preference pair's completion after a prompt with turns of its own)."""
  messages = _check_messages(messages)
  text = render_chat(tok, messages)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant" or i < trained_from:
      continue
    head = render_chat(tok, messages[:i], add_generation_prompt=True)
    through = render_chat(tok, messages[:i + 1])
    if not (text.startswith(through) and through.startswith(head)):
      raise ValueError("the chat template does not render conversations prefix by prefix; "
                       "cannot locate assistant turns for the loss mask")
    spans.append((len(head), len(through)))
  ids, offsets = tok.encode(text, offsets=True)
  mask = np.zeros(len(ids), np.int32)
  for start, end in spans:
    mask |= ((offsets[:, 0] >= start) & (offsets[:, 0] < end)).astype(np.int32)
  return ids, mask


def _eos(tok: Tokenizer) -> np.ndarray:
  return np.asarray([] if tok.eos_id is None else [tok.eos_id], np.int32)


def _bos(tok: Tokenizer) -> np.ndarray:
  return np.asarray([tok.bos_id] if tok.add_bos and tok.bos_id is not None else [], np.int32)


def detect(record: dict, fields: Fields) -> str:
  if fields.messages in record:
    return "messages"
  if fields.prompt in record and fields.completion in record:
    return "completion"
  if fields.text in record:
    return "text"
  raise ValueError(f"cannot tell the format of a record with fields {sorted(record)}: expected "
                   f"{fields.text!r}, {fields.prompt!r}+{fields.completion!r} or "
                   f"{fields.messages!r}")


def _field(record: dict, name: str, kind=str):
  if name not in record:
    raise ValueError(f"record has no field {name!r} (fields: {sorted(record)})")
  value = record[name]
  if not isinstance(value, kind):
    raise ValueError(f"field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
  return value


def _with_system(messages: list, system: str | None) -> list:
  if system is None or (messages and isinstance(messages[0], dict)
                        and messages[0].get("role") == "system"):
    return messages
  return [{"role": "system", "content": system}] + list(messages)


def encode(record: dict, tok: Tokenizer, fmt: str = "auto", fields: Fields = Fields(),
           chat: bool = True, system: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(ids, mask)`` int32 arrays of one record. ``system``: a system message put before
  chats that have none (else the template's default, if any, applies)."""
  if fmt == "auto":
    fmt = detect(record, fields)
  if fmt == "text":
    ids = np.concatenate([_bos(tok), tok.encode(_field(record, fields.text)), _eos(tok)])
    return ids, np.ones(len(ids), np.int32)
  if fmt == "messages":
    return encode_chat(tok, _with_system(_field(record, fields.messages, list), system))
  if fmt == "completion":
    prompt, completion = _field(record, fields.prompt), _field(record, fields.completion)
    if chat and tok.chat_template:
      return encode_chat(tok, _with_system([{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": completion}],
                                           system))
    head = np.concatenate([_bos(tok), tok.encode(prompt)])
    tail = np.concatenate([tok.encode(completion), _eos(tok)])
    return (np.concatenate([head, tail]).astype(np.int32),
            np.concatenate([np.zeros(len(head), np.int32), np.ones(len(tail), np.int32)]))
  raise ValueError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")


PAIR_FIELDS = ("chosen", "rejected")


def _turns(value, name: str, role: str) -> list[dict]:
  """A pair's prompt or completion as chat messages: a string is one ``role`` turn."""
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  if isinstance(value, list):
    return value
  raise ValueError(f"field {name!r} must be a string or a list of messages, got "
                   f"{type(value).__name__}")


def encode_pair(record: dict, tok: Tokenizer, fields: Fields = Fields(), chat: bool = True,
                system: str | None = None) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """A preference record (TRL's format: ``prompt`` and ``chosen`` / ``rejected``, each a
  string or a list of ``{role, content}`` messages) as two ``(ids, mask)``: the prompt
  followed by each completion, the mask on the completion's tokens only (its assistant
  turns and their end-of-turn tokens). Strings render as ``encode``'s completion format
  (a user turn and an assistant turn with a chat template, else plain concatenation);
  message lists with the chat template, the prompt's own assistant turns unmasked."""
  prompt = record.get(fields.prompt)
  missing = [f for f in (fields.prompt, *PAIR_FIELDS) if f not in record]
  if missing:
    raise ValueError(f"record has no field {missing[0]!r} (a preference pair needs "
                     f"{fields.prompt!r}, 'chosen' and 'rejected'; fields: {sorted(record)})")
  out = []
  for name in PAIR_FIELDS:
    value = record[name]
    if isinstance(prompt, str) and isinstance(value, str):
      ids, mask = encode({fields.prompt: prompt, fields.completion: value}, tok, "completion",
                         fields, chat, system)
    else:
      head = _with_system(_turns(prompt, fields.prompt, "user"), system)
      ids, mask = encode_chat(tok, head + _turns(value, name, "assistant"), len(head))
    if not mask.any():
      raise ValueError(f"field {name!r} renders to no completion tokens")
    out.append((ids, mask))
  return tuple(out)


def prompt_ids(record: dict, tok: Tokenizer, fields: Fields = Fields(), chat: bool = True,
               system: str | None = None):
  """Token ids a model is given to produce the record's completion (for evaluation)."""
  prompt = _field(record, fields.prompt)
  if chat and tok.chat_template:
    messages = _with_system([{"role": "user", "content": prompt}], system)
    return tok.encode(render_chat(tok, messages, add_generation_prompt=True))
  return np.concatenate([_bos(tok), tok.encode(prompt)]).astype(np.int32)
