"""The loss a train state trains and every metric measures.

A loss is ``fn(outputs, batch)``: ``outputs`` whatever the model returns (an array, a tuple, a
dict: any pytree), ``batch`` the whole batch dict (``batch['image']`` is what the model was
given, ``batch['label']`` any pytree of arrays with the batch axis first: integer classes,
regression targets, ``{'tokens', 'mask'}``, ...). It returns the scalar to minimise, or
``(scalar, aux)`` with ``aux`` a dict of scalar metrics reported beside ``loss`` by
``train_step`` / ``eval_step`` and averaged over examples by ``evaluate``. Give it once, to
``pfa_jax.train.create_train_state(..., loss=fn)``; the train and eval steps, the epochs and every
measurement of ``pfa_jax.metrics`` (gradient alignment, sharpness, attacks) then use it.

The default, ``classification``, is the mean softmax cross-entropy of ``(n, classes)`` logits
against ``(n,)`` integer labels, with ``accuracy`` as its aux; an optional ``batch['mask']`` of
``(n,)`` weights (1 for a real example, 0 for padding) weights both.
"""
from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

__all__ = ["classification", "cross_entropy", "Loss", "next_token"]

Loss = Callable  # (outputs, batch) -> scalar | (scalar, dict of scalars)


def cross_entropy(logits, labels):
    """Per-example softmax cross-entropy of logits ``(..., classes)`` and integer ``labels``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def classification(logits, batch: dict):
    """Mean cross-entropy of ``logits`` against ``batch['label']`` and ``{'accuracy'}``, both
    weighted by ``batch['mask']`` where the batch has one.

    Example:
      >>> import jax.numpy as jnp
      >>> loss, aux = classification(jnp.array([[2.0, 0.0], [0.0, 2.0]]),
      ...                            {"label": jnp.array([0, 0])})
      >>> round(float(loss), 4), float(aux["accuracy"])
      (1.1269, 0.5)
    """
    labels = batch["label"]
    losses = cross_entropy(logits, labels)
    hits = jnp.argmax(logits, -1) == labels
    if "mask" not in batch:
        return losses.mean(), {"accuracy": hits.mean()}
    mask = batch["mask"]
    count = jnp.sum(mask)
    return jnp.sum(losses * mask) / count, {"accuracy": jnp.sum(hits * mask) / count}


def next_token(logits, batch: dict):
    """A language model's loss: the mean cross-entropy (nats) of logits ``(n, length, vocabulary)``
    against the next tokens ``batch['label']`` ``(n, length)``, with ``accuracy`` and
    ``bits_per_token`` (the same mean in bits, ``loss / ln 2``: bits per character for a character
    model) as aux.

    Example:
      >>> import jax.numpy as jnp
      >>> loss, aux = next_token(jnp.zeros((1, 3, 4)), {"label": jnp.array([[0, 1, 2]])})
      >>> round(float(aux["bits_per_token"]), 4)    # uniform over 4 tokens: 2 bits
      2.0
    """
    losses = cross_entropy(logits, batch["label"])
    loss = losses.mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
                  "bits_per_token": loss / jnp.log(2.0)}


def value_and_aux(fn: Loss, outputs, batch: dict) -> tuple[jnp.ndarray, dict]:
    """``fn(outputs, batch)`` as ``(scalar, aux dict)``, or an error naming what came back."""
    result = fn(outputs, batch)
    value, aux = result if isinstance(result, tuple) else (result, {})
    if jnp.ndim(value) != 0 or not isinstance(aux, dict):
        raise ValueError(f"the loss {getattr(fn, '__name__', fn)!r} must return a scalar or "
                         f"(scalar, dict of metrics); got a value of shape {jnp.shape(value)} and "
                         f"an aux of type {type(aux).__name__}")
    return value, aux
