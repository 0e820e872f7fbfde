"""``create_train_state``: a model initialised, its rule decided for the optimizer, its layers
traced."""
from __future__ import annotations

import functools
import re

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pfa_jax import layers as player
from pfa_jax import losses
from pfa_jax import nn as pnn
from pfa_jax.optim import build
from pfa_jax.rules import forms
from pfa_jax.train._state import FEEDBACK_STREAM, TrainState, apply_with_rule, mirror
from pfa_jax.train._steps import eval_step


def _trace(model, variables, images, streams: tuple[str, ...] | None
           ) -> tuple[player.Table, tuple[str, ...], int]:
    """The layer table, the RNG streams and the logits' width (0 for outputs that are not one
    array) of a training-mode ``model.apply``, from one trace of it (shapes only): ``streams`` as
    given, or (``None``) each one flax reports missing."""
    found = list(streams or ())
    for _ in range(16):
        records = {}
        try:
            with pnn.recording(records):
                logits, _ = jax.eval_shape(lambda: apply_with_rule(model, variables, images, True, {
                    name: jax.random.key(0) for name in (FEEDBACK_STREAM, *found)}))
            width = logits.shape[-1] if isinstance(logits, jax.ShapeDtypeStruct) else 0
            return player.from_records(records, variables["params"]), tuple(sorted(found)), width
        except flax.errors.InvalidRngError as error:
            missing = re.search(r'needs PRNG for "([^"]+)"', str(error))
            if streams is not None or missing is None or missing.group(1) in found:
                raise ValueError(f"the model asks for an RNG stream in training mode ({error}); "
                                 "pass rng_streams=('name', ...) to create_train_state") from None
            found.append(missing.group(1))
    raise ValueError(f"the model asks for more than 16 RNG streams: {found}")


def create_train_state(key: jax.Array, model: nn.Module, sample_batch, tx=None, *,
                       feedback_tx: optax.GradientTransformation | None = None,
                       rng_streams: tuple[str, ...] | None = None,
                       loss: losses.Loss | None = None) -> TrainState:
    """Initialises ``model`` on ``sample_batch``; weight-mirror layers then take their mirroring
    phase.

    PFA's ``form="auto"`` in the model's ``rule`` field is decided for the optimizer that steps the
    feedback (``pfa_jax.rules.for_optimizer``: the fast ``"G"`` form under SGD-family optimizers,
    the authors' ``"R"`` under Adam); ``state.model`` holds the decided rule.

    Args:
      key: the key of the parameters, the feedback draws and the per-step RNG streams.
      model: a ``flax.linen`` module whose layers follow a rule (``pfa_jax.models.get``,
        ``pfa_jax.nn.with_rule``).
      sample_batch: a batch dict with ``'image'`` (and ``'label'``), or an image array ``(n, ...)``.
      tx: any ``optax.GradientTransformation`` for ``params`` (it sees the params tree as it is),
        or an ``OptimizerConfig`` / mapping / ConfigDict (``pfa_jax.optim.build``), or ``None``
        (the default SGD).
      feedback_tx: the transformation of plastic feedback (``None``: ``tx``, with a state of its
        own).
      rng_streams: the RNG streams a training-mode forward pass draws from besides ``feedback``
        (e.g. ``('dropout',)``); ``None`` finds them by tracing the model.
      loss: ``fn(outputs, batch)`` returning the scalar or ``(scalar, aux dict)``
        (``pfa_jax.losses``; default: softmax cross-entropy with accuracy), which every step, epoch
        and metric of the state then uses; with a ``sample_batch`` dict it is traced once here, so
        that a loss that does not fit the model's outputs fails now.

    Returns:
      The ``TrainState``: ``step``, ``params``, ``feedback``, ``batch_stats``, ``opt_state``, and
      the static ``model``, ``tx``, ``feedback_tx`` and ``layers`` (each layer's path and rule).

    Example:
      >>> import jax, jax.numpy as jnp, optax, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="pfa", widths=(16,))
      >>> state = pj.train.create_train_state(jax.random.key(0), model, jnp.ones((1, 8, 8, 1)),
      ...                                     optax.sgd(0.1, momentum=0.9))
      >>> state.model.rule.form  # decided for SGD
      'G'
      >>> [layer.path for layer in state.layers]
      ['hidden_0', 'output']
    """
    images = jnp.asarray(sample_batch["image"] if isinstance(sample_batch, dict) else sample_batch)
    if images.ndim < 2:
        raise ValueError(f"create_train_state: the sample of shape {images.shape} has no batch "
                         "axis; pass a batch (n, ...) of inputs, e.g. images[:1]")
    init_key, feedback_key, state_key = jax.random.split(key, 3)
    built, built_feedback = build(tx, feedback_tx)  # rebuilt below in the parameters' dtype
    model = forms.for_model(model, built_feedback or built)
    rngs = {"params": init_key, FEEDBACK_STREAM: feedback_key}
    variables = jax.jit(functools.partial(model.init, train=False))(rngs, images)
    params = variables["params"]
    pnn.check_rule_map(getattr(model, "rule", None), params)
    floats = [p.dtype for p in jax.tree.leaves(params) if jnp.issubdtype(p.dtype, jnp.floating)]
    tx, feedback_tx = build(tx, feedback_tx, jnp.result_type(*floats) if floats else jnp.float32)
    batch_stats = variables.get("batch_stats", {})
    carried = {"params": params, "feedback": variables.get("feedback", {}),
               "batch_stats": batch_stats}
    table, streams, num_classes = _trace(model, carried, images, rng_streams)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, feedback=carried["feedback"],
        batch_stats=batch_stats, opt_state=None, rng=state_key, model=model, tx=tx,
        feedback_tx=feedback_tx or tx, layers=table, rng_streams=streams,
        input_shape=tuple(images.shape[1:]), num_classes=num_classes,
        loss=loss or losses.classification)
    if isinstance(sample_batch, dict) and "label" in sample_batch:
        jax.eval_shape(eval_step, state, sample_batch)
    state = state.replace(opt_state=state.init_opt_state())
    if state.mirrored:
        state = jax.jit(mirror, static_argnames="warmup")(state, warmup=True)
    return state
