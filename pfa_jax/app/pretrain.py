"""Noise pretraining (Cheon, Lee & Paik, NeurIPS 2024): train steps with the rule on Gaussian noise
with random labels, before any data.

    state, per_step = noise_pretrain(state, key, steps, batch_size, num_classes)

Each step trains on ``N(0, 1)`` images shaped like the data (``state.input_shape``, i.e. in the
standardised pixel space) with labels uniform in ``0..num_classes-1``, drawn from the step's key
(``split(key, steps)``). The parameters, feedback and BatchNorm statistics it reaches are kept; the
optimizer then starts afresh (new optimizer state, ``step = 0``), so the data phase runs its usual
learning-rate and weight-decay schedule from its first epoch. ``loop`` as in
``pfa_jax.loops.resolve``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pfa_jax import loops, train

__all__ = ["noise_pretrain"]


def _noise_step(state: train.TrainState, key, *, batch_size: int, num_classes: int):
    """``train_step`` on ``N(0, 1)`` images with uniformly random labels drawn from ``key``."""
    image_key, label_key = jax.random.split(key)
    return train.train_step(state, {
        "image": jax.random.normal(image_key, (batch_size,) + tuple(state.input_shape)),
        "label": jax.random.randint(label_key, (batch_size,), 0, num_classes)})


_pretraining = loops.Loop(_noise_step, static_argnames=("batch_size", "num_classes"))


@jax.jit
def _restart_optimizer(state: train.TrainState) -> train.TrainState:
    return state.replace(step=jnp.zeros_like(state.step), opt_state=state.init_opt_state())


def noise_pretrain(state: train.TrainState, key, steps: int, batch_size: int, num_classes: int,
                   loop: str = "auto"):
    """``steps`` noise-pretraining steps (module docstring); returns ``(state, per-step
    metrics)``."""
    state, metrics = _pretraining(state, jax.random.split(key, steps),
                                  loop=loops.resolve(loop, state.params), batch_size=batch_size,
                                  num_classes=num_classes)
    return _restart_optimizer(state), metrics
