"""What trains, and an optax optimizer that keeps state only for what trains.

Training works on two trees: ``trainable = {"lora": adapters, "full": {...}}`` (adapters
plus any parameters trained in full, PEFT's ``modules_to_save``) and the frozen rest.
Gradients are taken with respect to ``trainable`` alone, so no gradient of a frozen weight
is ever computed, and the optimizer is an ``optax.multi_transform`` keyed by leaf role:
A factors, B factors (LoRA+: its own learning-rate multiplier), full parameters, and
``frozen`` (``optax.set_to_zero``: no state), so the same optimizer is also safe on a tree
that contains frozen leaves. Learning-rate schedules live here too (``schedule``).
The update step itself is ``jlora.run.train_step.make_step``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from jlora.core import lora as lora_lib

PyTree = Any
ScalarOrSchedule = float | Callable[[Any], Any]


def partition(params: PyTree, spec: lora_lib.LoraSpec | lora_lib.Plan) -> tuple[dict, dict]:
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


def trainable(params: PyTree, adapters: PyTree, spec: lora_lib.LoraSpec | lora_lib.Plan
              ) -> tuple[dict, dict]:
  """(trainable, frozen): ``trainable = {"lora": adapters, "full": fully trained params}``."""
  full, frozen = partition(params, spec)
  return {"lora": adapters, "full": full}, frozen


def model_params(trainable_: PyTree, frozen: PyTree,
                 spec: lora_lib.LoraSpec | lora_lib.Plan) -> dict:
  """The parameters the model sees: the frozen base with the fully trained leaves put
  back and each adapter's factors beside its kernel (``lora.with_adapters``). Every
  forward pass of a training run (loss, evaluation, sampling) goes through this."""
  params = combine(trainable_["full"], frozen)
  return lora_lib.with_adapters(params, trainable_["lora"], spec) if trainable_["lora"] \
      else params


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


def schedule(lr: float, steps: int, kind: str = "constant", warmup_steps: int = 0
             ) -> ScalarOrSchedule:
  """Constant (the findings' default) or cosine/linear decay to 0 after ``steps``, each
  after a linear warm-up of ``warmup_steps``. A constant schedule with no warm-up is the
  float itself."""
  w = warmup_steps
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, w, max(steps, w + 1), 0.0)
  if kind not in ("constant", "linear"):
    raise ValueError(f"schedule {kind!r} is not constant, cosine or linear")
  after = (optax.constant_schedule(lr) if kind == "constant"
           else optax.linear_schedule(lr, 0.0, max(steps - w, 1)))
  if w == 0:
    return lr if kind == "constant" else after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, w), after], [w])


def lr_at(lr: ScalarOrSchedule, step: int) -> float:
  """The learning rate a schedule (or a float) gives at ``step``."""
  return float(lr(step) if callable(lr) else lr)
