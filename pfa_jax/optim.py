"""The papers' optimizers as optax transformations, with per-epoch multi-step schedules of the
learning rate and the weight decay; and how ``create_train_state`` takes any optimizer.

``pfa_jax.train.create_train_state`` takes any ``optax.GradientTransformation`` (a chain with
clipping, schedules as callables, ``optax.inject_hyperparams``), or an ``OptimizerConfig`` / mapping /
``ConfigDict``, which ``build`` turns into one transformation (built once; nothing else of the
description is kept).

The papers train with SGD, momentum 0.9 and *coupled* weight decay (PyTorch's ``weight_decay``):

    u = g + wd * w;   m <- mu m + u;   w <- w - lr m

and change ``lr`` and ``wd`` at epoch milestones (PFA needs a large ``wd`` in epoch 0 only). A schedule
is either one value per segment, ``learning_rate=(0.01, 0.005, 0.0025)`` with ``lr_milestones=(20,
30)``, or a start value decayed at each milestone, ``learning_rate=0.1, lr_decay=0.1,
lr_milestones=(100, 150, 200)``. Weight decay takes a constant or one value per segment
(``weight_decay=(0.03, 9e-5), wd_milestones=(1,)``). Milestones are epochs; ``steps_per_epoch``
turns them into steps.

``name``: ``'sgd'`` (above; ``nesterov`` optional), ``'adam'`` (coupled decay added to the gradient
before Adam) or ``'adamw'`` (decoupled: ``w <- w - lr (adam(g) + wd w)``).

The built transformation is ``optax.inject_hyperparams``-wrapped, so its optimizer state holds the
learning rate and weight decay of every step (``hyperparameters``), which ``train_step`` logs.

Plastic feedback (KP's ``B``, PFA's ``R``) is stepped by the same optimizer unless ``feedback`` gives
overrides, e.g. ``feedback={'weight_decay': 0.0}``. Fixed feedback is never given to the optimizer.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from pfa_jax import fields

__all__ = ["coupled_sgd", "hyperparameters", "multistep", "OptimizerConfig", "scheduled"]

OPTIMIZERS = ("sgd", "adam", "adamw")
# field -> (whether a value is valid, the valid values in words)
_RANGES = {
    "lr_decay": (lambda v: 0 < v < math.inf, "a finite number > 0 (the factor at each milestone)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eps": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "steps_per_epoch": (lambda v: v >= 1, "a positive int"),
}
Schedule = Callable[[Any], Any]


def multistep(values, milestones, steps_per_epoch: int, dtype=jnp.float32) -> Schedule:
    """``step -> values[i]`` (of ``dtype``) where ``i`` counts the milestones (epochs) already
    reached."""
    boundaries = jnp.asarray(milestones, jnp.int32) * steps_per_epoch
    values = jnp.asarray(values, dtype)
    return lambda step: values[jnp.searchsorted(boundaries, step, side="right")]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    learning_rate: float | tuple[float, ...] = 0.01
    lr_milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1
    weight_decay: float | tuple[float, ...] = 0.0
    wd_milestones: tuple[int, ...] = ()
    momentum: float = 0.9
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    steps_per_epoch: int = 1
    feedback: OptimizerConfig | None = None

    @classmethod
    def create(cls, config: OptimizerConfig | Mapping | Any | None = None, **overrides
               ) -> OptimizerConfig:
        """From an ``OptimizerConfig``, a mapping or an ``ml_collections.ConfigDict``."""
        if config is None:
            config = {}
        if isinstance(config, OptimizerConfig):
            return dataclasses.replace(config, **overrides)
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        options = {**dict(config), **overrides}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown optimizer option(s) {unknown}; valid options: {valid}")
        for key in ("learning_rate", "weight_decay", "lr_milestones", "wd_milestones"):
            if isinstance(options.get(key), list):
                options[key] = tuple(options[key])
        feedback = options.pop("feedback", None)
        base = cls(**options)
        if hasattr(feedback, "to_dict"):
            feedback = feedback.to_dict()
        if feedback is not None and not isinstance(feedback, dict):
            raise ValueError(f"optimizer.feedback={feedback!r} must be a dict of overrides for the "
                             "optimizer of plastic feedback, e.g. {'weight_decay': 0.0}")
        if feedback:
            unknown = sorted(set(feedback) - set(valid) | ({"feedback"} & set(feedback)))
            if unknown:
                raise ValueError(f"unknown optimizer.feedback option(s) {unknown}; valid options: "
                                 f"{[v for v in valid if v != 'feedback']}")
            try:
                stepped = cls.create(base, feedback=None, **feedback)
            except ValueError as error:  # name the key where it was given
                raise ValueError(str(error).replace("optimizer.", "optimizer.feedback.").replace(
                    "unknown optimizer option(s)", "unknown optimizer.feedback option(s)")) from None
            base = dataclasses.replace(base, feedback=stepped)
        return base

    def __post_init__(self):
        """Every field checked: its type (``pfa_jax.fields``), then its range (``_RANGES``)."""
        fields.check(OptimizerConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                       if f.name != "feedback"}, "optimizer.")
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name={self.name!r} is unknown; valid: {OPTIMIZERS}")
        for key, (valid, words) in _RANGES.items():
            if not valid(getattr(self, key)):
                raise ValueError(f"optimizer.{key}={getattr(self, key)!r} must be {words}")
        self.segment_values("learning_rate", "lr_milestones")
        self.segment_values("weight_decay", "wd_milestones")

    def segment_values(self, key: str, milestones_key: str) -> tuple[float, ...]:
        """One value per schedule segment, validated."""
        value, milestones = getattr(self, key), tuple(getattr(self, milestones_key))
        if any(not isinstance(m, int) or m < 1 for m in milestones) or list(milestones) != sorted(
                set(milestones)):
            raise ValueError(f"optimizer.{milestones_key}={milestones!r} must be strictly increasing "
                             "positive epochs")
        if isinstance(value, tuple):
            values = value
        elif key == "learning_rate":
            values = tuple(value * self.lr_decay ** i for i in range(len(milestones) + 1))
        elif milestones:
            raise ValueError(f"optimizer.{milestones_key}={milestones!r} needs one {key} per segment: "
                             f"a tuple of {len(milestones) + 1} values, got {value!r}")
        else:
            values = (value,)
        if len(values) != len(milestones) + 1:
            raise ValueError(f"optimizer.{key}={value!r} has {len(values)} values for "
                             f"{len(milestones)} milestones {milestones_key}={milestones!r}; need "
                             f"{len(milestones) + 1}")
        if any(not 0 <= v < math.inf for v in values):
            raise ValueError(f"optimizer.{key}={value!r} must be finite and non-negative")
        return values

    def schedules(self, dtype=jnp.float32) -> tuple[Schedule, Schedule]:
        """(learning-rate schedule, weight-decay schedule), functions of the step with values of
        ``dtype`` (the parameters'; ``create_train_state`` passes it)."""
        return (multistep(self.segment_values("learning_rate", "lr_milestones"), self.lr_milestones,
                          self.steps_per_epoch, dtype),
                multistep(self.segment_values("weight_decay", "wd_milestones"), self.wd_milestones,
                          self.steps_per_epoch, dtype))

    def options(self) -> dict:
        """The keyword arguments of ``scheduled`` that build this optimizer (the learning rate and
        the weight decay as one value per schedule segment)."""
        return {"name": self.name, "learning_rate": self.segment_values("learning_rate", "lr_milestones"),
                "lr_milestones": self.lr_milestones,
                "weight_decay": self.segment_values("weight_decay", "wd_milestones"),
                "wd_milestones": self.wd_milestones, "steps_per_epoch": self.steps_per_epoch,
                "momentum": self.momentum, "nesterov": self.nesterov, "b1": self.b1, "b2": self.b2,
                "eps": self.eps}

    def transformation(self, dtype=jnp.float32) -> optax.GradientTransformation:
        """``scheduled(**self.options(), dtype=dtype)``: values of ``dtype``, that of the parameters
        it steps, so float64 parameters get float64 rates and float32 ones are never promoted."""
        return scheduled(**self.options(), dtype=dtype)


def scheduled(name: str = "sgd", learning_rate=(0.01,), lr_milestones=(), weight_decay=(0.0,),
              wd_milestones=(), steps_per_epoch: int = 1, momentum=0.9, nesterov: bool = False,
              b1=0.9, b2=0.999, eps=1e-8, dtype=jnp.float32) -> optax.GradientTransformation:
    """The papers' optimizers as one optax alias (module docstring): ``name`` ``'sgd'``
    (``coupled_sgd``), ``'adam'`` or ``'adamw'``, the learning rate and the weight decay piecewise
    constant over epochs, ``learning_rate[k]`` from epoch ``lr_milestones[k - 1]`` on
    (``multistep``), injected with ``optax.inject_hyperparams`` so the state holds each step's.

    Every number may be a traced value (one value per segment for the rates), so this serves as a
    ``pfa_jax.population`` factory: ``functools.partial(scheduled, name=..., lr_milestones=...)``
    with per-member ``learning_rate``, ``weight_decay``, ``momentum``, ``b1``, ``b2``, ``eps``.

    Args:
      name: ``'sgd'``, ``'adam'`` or ``'adamw'`` (``OPTIMIZERS``).
      learning_rate: one value per segment: ``len(lr_milestones) + 1`` values.
      lr_milestones: the epochs at which the next learning rate starts, increasing.
      weight_decay: one value per segment of ``wd_milestones``.
      wd_milestones: the epochs at which the next weight decay starts.
      steps_per_epoch: turns the milestones into steps.
      momentum, nesterov: SGD's.
      b1, b2, eps: Adam's.
      dtype: of the rates (the parameters' dtype, so that none is promoted).

    Returns:
      The ``optax.GradientTransformation``.

    Example:

    >>> tx = scheduled("sgd", learning_rate=(0.1, 0.01), lr_milestones=(1,), steps_per_epoch=2)
    >>> params = {"w": jnp.array([1.0])}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...     _, state = tx.update({"w": jnp.array([1.0])}, state, params)
    >>> state.hyperparams["learning_rate"]  # step 2 is in epoch 1
    Array(0.01, dtype=float32)
    """
    def make(learning_rate, weight_decay):
        if name == "sgd":
            return coupled_sgd(learning_rate, momentum, weight_decay, nesterov)
        decay = optax.add_decayed_weights(weight_decay)
        adam = optax.scale_by_adam(b1, b2, eps)
        return optax.chain(*([decay, adam] if name == "adam" else [adam, decay]),
                           optax.scale_by_learning_rate(learning_rate))

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name={name!r} is unknown; valid: {OPTIMIZERS}")
    return optax.inject_hyperparams(make)(
        learning_rate=multistep(learning_rate, lr_milestones, steps_per_epoch, dtype),
        weight_decay=multistep(weight_decay, wd_milestones, steps_per_epoch, dtype))


def coupled_sgd(learning_rate, momentum: float = 0.9, weight_decay=0.0, nesterov: bool = False
                ) -> optax.GradientTransformation:
    """The papers' SGD with *coupled* weight decay (PyTorch's ``weight_decay``), as an optax alias:
    ``u = g + wd w;  m <- mu m + u;  w <- w - lr m`` (``nesterov``: ``w <- w - lr (u + mu m)``).

    ``learning_rate`` and ``weight_decay``: numbers (traced scalars too, so it serves as a
    ``pfa_jax.population`` factory) or optax schedules of the step (``multistep``).

    Example:

    >>> import jax.numpy as jnp
    >>> tx = coupled_sgd(0.1, momentum=0.9, weight_decay=0.5)
    >>> w = {"w": jnp.array([2.0])}
    >>> steps, _ = tx.update({"w": jnp.array([1.0])}, tx.init(w), w)
    >>> steps["w"]  # -lr (g + wd w) = -0.1 (1 + 0.5 * 2)
    Array([-0.2], dtype=float32)
    """
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.trace(decay=momentum, nesterov=nesterov),
                       optax.scale_by_learning_rate(learning_rate))


def build(optimizer=None, feedback=None, dtype=jnp.float32, **overrides
          ) -> tuple[optax.GradientTransformation, optax.GradientTransformation | None]:
    """``(tx, feedback_tx)`` from what ``create_train_state`` is given.

    ``optimizer``: an ``optax.GradientTransformation`` (used as it is), or an ``OptimizerConfig``,
    mapping or ``ConfigDict`` (``OptimizerConfig.create(optimizer, **overrides)``; its ``feedback``
    overrides, if any, become ``feedback_tx``), or ``None`` (the default ``OptimizerConfig``).
    ``feedback``: a separate transformation for plastic feedback (``None``: ``tx`` steps it too).
    ``dtype``: of the schedules' values (the parameters' dtype).
    """
    if isinstance(optimizer, optax.GradientTransformation):
        if overrides:
            raise ValueError(f"optimizer options {sorted(overrides)} apply to an OptimizerConfig, "
                             "not to an optax transformation; build them into the transformation")
        return optimizer, feedback
    config = OptimizerConfig.create(optimizer, **overrides)
    if feedback is None and config.feedback is not None:
        feedback = dataclasses.replace(config.feedback,
                                       steps_per_epoch=config.steps_per_epoch).transformation(dtype)
    return config.transformation(dtype), feedback


def hyperparameters(opt_state) -> dict:
    """The hyper-parameters an optimizer state holds for its last step: those of every
    ``optax.inject_hyperparams`` state in it, e.g. ``{'learning_rate': ..., 'weight_decay': ...}``.

    Where several injected states name the same hyper-parameter, the first (in tree order) is kept.
    Hyper-parameters that are not injected are unknown and are not reported.
    """
    injected = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    found = {}
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, injected)):
        if isinstance(node, injected):
            for name, value in node.hyperparams.items():
                found.setdefault(name, value)
    return found
