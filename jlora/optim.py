"""What trains, and an optax optimizer that keeps state only for what trains.

Training works on two trees: ``trainable = {"lora": adapters, "full": {...}}`` (adapters
plus any parameters trained in full, PEFT's ``modules_to_save``) and the frozen rest.
Gradients are taken with respect to ``trainable`` alone, so no gradient of a frozen weight
is ever computed, and the optimizer is an ``optax.multi_transform`` keyed by leaf role:
A factors, B factors (LoRA+: its own learning-rate multiplier), full parameters, and
``frozen`` (``optax.set_to_zero``: no state), so the same optimizer is also safe on a tree
that contains frozen leaves.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from jlora import lora as lora_lib

PyTree = Any
ScalarOrSchedule = float | Callable[[Any], Any]


def partition(params: PyTree, spec: lora_lib.LoraSpec) -> tuple[dict, dict]:
  """Split params into (fully trained, frozen) nested dicts by ``spec.full``."""
  flat = lora_lib.flatten(params)
  full = {p: v for p, v in flat.items() if lora_lib.is_full(p, spec)}
  frozen = {p: v for p, v in flat.items() if p not in full}
  return lora_lib.unflatten(full), lora_lib.unflatten(frozen)


def combine(full: PyTree, frozen: PyTree) -> dict:
  """Inverse of ``partition``: one nested params dict."""
  flat = lora_lib.flatten(frozen)
  overlap = set(flat) & set(lora_lib.flatten(full))
  if overlap:
    raise ValueError(f"parameter '{sorted(overlap)[0]}' is both frozen and trained")
  return lora_lib.unflatten({**flat, **lora_lib.flatten(full)})


def trainable(params: PyTree, adapters: PyTree, spec: lora_lib.LoraSpec) -> tuple[dict, dict]:
  """(trainable, frozen): ``trainable = {"lora": adapters, "full": fully trained params}``."""
  full, frozen = partition(params, spec)
  return {"lora": adapters, "full": full}, frozen


def _label(keypath, _) -> str:
  path = lora_lib.path_str(keypath)
  if path.startswith("lora/"):
    return "lora_" + path.rsplit("/", 1)[-1]
  if path.startswith("full/"):
    return "full"
  return "frozen"


def labels(tree: PyTree) -> PyTree:
  """Role of every leaf: "lora_a", "lora_b", "full" or "frozen"."""
  return jax.tree_util.tree_map_with_path(_label, tree)


def _scaled(lr: ScalarOrSchedule, factor: float) -> ScalarOrSchedule:
  if factor == 1.0:
    return lr
  return (lambda step: factor * lr(step)) if callable(lr) else factor * lr


def optimizer(learning_rate: ScalarOrSchedule, *, b_lr_ratio: float = 1.0,
              weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, max_grad_norm: float | None = None,
              ) -> optax.GradientTransformation:
  """AdamW over a ``{"lora": ..., "full": ...}`` tree; state only for trainable leaves.

  Args:
    learning_rate: a float or an optax schedule (for A, B and full parameters).
    b_lr_ratio: LoRA+ multiplier for B's learning rate (1.0: same LR, the default the
      findings recommend; ~16 is common LoRA+ practice).
    weight_decay: decoupled weight decay (0 by default).
    b1, b2, eps: Adam moments.
    max_grad_norm: clip the global gradient norm first, if given.
  """
  if b_lr_ratio <= 0:
    raise ValueError(f"b_lr_ratio must be > 0, got {b_lr_ratio!r}")
  adam = lambda lr: optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  tx = optax.multi_transform(
      {"lora_a": adam(learning_rate), "lora_b": adam(_scaled(learning_rate, b_lr_ratio)),
       "full": adam(learning_rate), "frozen": optax.set_to_zero()},
      labels)
  if max_grad_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
  return tx


def step_fn(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """A pure update step: gradients w.r.t. ``trainable`` only, then the optax update.

  Args:
    loss_fn: ``loss_fn(trainable, frozen, *batch) -> scalar``.
    tx: e.g. ``optimizer(...)``.
  Returns:
    ``step(trainable, opt_state, frozen, *batch) -> (trainable, opt_state, loss)``; jit it
    with ``donate_argnums=(0, 1)``.
  """
  def step(trainable_, opt_state, frozen, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(trainable_, frozen, *batch)
    updates, opt_state = tx.update(grads, opt_state, trainable_)
    return optax.apply_updates(trainable_, updates), opt_state, loss
  return step
