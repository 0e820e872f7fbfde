"""What every metric takes: a state (a ``TrainState``, or any model an adapter registered with
``as_state`` turns into one: ``pfa_jax.nnx`` registers its models) and batches."""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax

from pfa_jax import loops
from pfa_jax.train import eval_step


@functools.singledispatch
def as_state(state):
    """The ``TrainState`` a metric measures: a ``TrainState`` as it is; another type as the adapter
    registered for it (``as_state.register(cls, fn)``; ``pfa_jax.nnx`` registers ``nnx.Module``
    as its linen twin's state, ``pfa_jax.nnx.linen_state``)."""
    return state


def batch_list(state, batches, where: str) -> list[dict]:
    """One batch dict or a sequence of them, as a non-empty list, each checked against ``state``
    (``pfa_jax.train.check_batch``)."""
    batches = [batches] if isinstance(batches, Mapping) else list(batches)
    if not batches:
        raise ValueError(f"{where}: no batches given; pass a batch {{'image', 'label'}} or a list "
                         "of them")
    for batch in batches:
        state.check(batch["image"], batch["label"], where)
    return batches


def mean_over(batches: list[dict], fn):
    """The mean over all examples of the per-batch means ``fn(b, i_b)``."""
    return loops.weighted_mean([fn(b, i) for i, b in enumerate(batches)],
                               [len(b["label"]) for b in batches])


@jax.jit
def accuracy_of(state, images, labels) -> jax.Array:
    metrics = eval_step(state, {"image": images, "label": labels})
    if "accuracy" not in metrics:
        raise ValueError("the robustness metrics report accuracy, and the state's loss gives no "
                         f"'accuracy' among its aux metrics (it gives {sorted(metrics)}); return "
                         "(loss, {'accuracy': ...}) from it")
    return metrics["accuracy"]


def default_key(state, key, salt: int):
    return jax.random.fold_in(state.rng, salt) if key is None else key
