"""Training state and pure steps: ``create_train_state``, ``train_step``, ``eval_step``, compiled epochs,
and data parallelism.

One step is one ``jax.value_and_grad`` of the mean cross-entropy over ``(params, plastic feedback)``;
the rules' custom VJPs make the feedback gradients their feedback-learning signals. The state's
optimizer ``tx`` (any ``optax.GradientTransformation``, or the papers' ``OptimizerConfig``, see
``pfa_jax.optim``) steps ``params``; plastic feedback (KP's ``B``, PFA's ``R``) is stepped by
``feedback_tx``, which is ``tx`` itself (a separate state of it) unless another is given. Fixed
feedback is never given to an optimizer, so it stays bit-identical whatever ``tx`` does (clipping,
decoupled decay, Adam). Weight-mirror feedback is stepped by ``mirror`` instead: a mirroring phase in
``create_train_state`` and mirror steps after every training step. Which array is which comes from
the model's layer table (``pfa_jax.layers``). DFA layers get the output error through taps the model
adds to its logits.

Any linen model called as ``model.apply(variables, images, train=bool)`` works: RNG streams other
than ``params`` (e.g. ``dropout``) get a fresh key every step, derived from the state's key and step
per stream (``step_rngs``); a model with an ``axis_name`` field gets it set under ``pmap``. Logged
hyper-parameters come from the optimizer state (``optax.inject_hyperparams``) where it has them.

What enters is checked (``check_batch``), naming the shapes or values refused: images of the
state's ``input_shape`` (the sample's, minus its batch axis), one integer label per image, and
label values in ``[0, num_classes)`` where the labels are concrete (``train_epoch``, ``evaluate``
and the metrics; inside ``jit`` only shapes can be checked, at trace time, for free).

Data parallel, two ways, same numbers as one device:

* ``jax.pmap(train_step, axis_name="batch")`` on replicated state (``replicate``) and a batch split on
  its leading axis (``split_batch``): inside, ``train_step`` sees the bound axis ``"batch"`` and averages
  loss, gradients and feedback signals with ``lax.pmean``; BatchNorm statistics are averaged across
  devices too (the model is cloned with ``axis_name``), so it equals one big batch.
* ``jax.jit(train_step)`` with the batch sharded over a device mesh (``shard_batch``, a
  ``NamedSharding`` over axis ``"batch"``) and the state replicated: XLA partitions the same program.
  ``train_epoch`` and ``evaluate`` take that ``NamedSharding`` as ``sharding=`` and split every
  batch of an in-memory epoch the same way (``pfa_jax.app.placement`` does this for the command).
  The repository's ``docs/scale.md`` shows both.
"""
from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from pfa_jax import augment as pfa_augment
from pfa_jax import layers as player
from pfa_jax import loops, losses
from pfa_jax import nn as pnn
from pfa_jax.optim import build, hyperparameters
from pfa_jax.rules import forms

__all__ = ["apply_with_rule", "AXIS", "batch_mesh", "check_batch", "create_train_state", "cross_entropy",
           "eval_step", "evaluate", "FEEDBACK_STREAM", "mirror", "replicate", "replicate_on",
           "shard_batch", "split_batch", "step_rngs", "train_epoch", "train_step", "TrainState",
           "unreplicate"]

AXIS = "batch"
FEEDBACK_STREAM = "feedback"  # the RNG stream of rules that redraw feedback every step (brsf)


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    feedback: Any
    batch_stats: Any
    opt_state: Any  # {'params': tx state, 'feedback': feedback_tx state}
    rng: jax.Array
    model: nn.Module = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    feedback_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    layers: player.Table = struct.field(pytree_node=False, default=())
    rng_streams: tuple[str, ...] = struct.field(pytree_node=False, default=())
    input_shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    num_classes: int = struct.field(pytree_node=False, default=0)  # the width of the logits
    loss: losses.Loss = struct.field(pytree_node=False, default=losses.classification)

    def check(self, images, labels, where: str) -> None:
        """``check_batch`` against this state's input shape and, under the default loss, its
        number of classes; under an own loss ``labels`` is any pytree of arrays whose leading
        axis is the batch's."""
        if self.loss is losses.classification:
            check_batch(images, labels, input_shape=self.input_shape,
                        num_classes=self.num_classes, where=where)
            return
        check_batch(images, input_shape=self.input_shape, where=where)
        n = jnp.shape(images)[:1]
        bad = {jnp.shape(leaf) for leaf in jax.tree.leaves(labels) if jnp.shape(leaf)[:1] != n}
        if bad:
            raise ValueError(f"{where}: label arrays of shapes {sorted(bad)} do not match images "
                             f"of shape {tuple(jnp.shape(images))}: each needs the batch axis "
                             f"first, {n}")

    def variables(self) -> dict:
        return {"params": self.params, "feedback": self.feedback, "batch_stats": self.batch_stats}

    @property
    def mirrored(self) -> bool:
        """Whether the model has weight-mirror layers."""
        return any(layer.rule.mirrored for layer in self.layers)

    def plastic_feedback(self) -> dict:
        """The feedback arrays the optimizer steps."""
        return player.select(self.feedback, player.feedback_labels(self.layers, self.feedback),
                             player.PLASTIC)

    def init_opt_state(self) -> dict:
        return {"params": self.tx.init(self.params),
                "feedback": self.feedback_tx.init(self.plastic_feedback())}


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


def mirror(state: TrainState, warmup: bool = False) -> TrainState:
    """Weight-mirror layers take their mirror steps (``warmup``: the initial mirroring phase), with
    noise from a key derived from ``state.rng`` and ``state.step`` (``pfa_jax.layers.mirror``)."""
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
    return state.replace(feedback=player.mirror(state.layers, state.params, state.feedback, key,
                                                warmup))


def step_rngs(state: TrainState) -> dict:
    """The RNG keys of the state's next train step: ``feedback`` from ``fold_in(rng, step)``, every
    other stream of ``state.rng_streams`` from that key folded with ``crc32(name)``."""
    key = jax.random.fold_in(state.rng, state.step)
    return {FEEDBACK_STREAM: key,
            **{name: jax.random.fold_in(key, zlib.crc32(name.encode())) for name in state.rng_streams}}


def check_batch(images, labels=None, *, input_shape=(), num_classes: int = 0,
                where: str = "batch") -> None:
    """Raises ``ValueError`` naming ``where`` and the shapes unless ``images`` is ``(n >= 1,
    *input_shape)`` (any shape if ``input_shape`` is empty) and ``labels`` ``(n,)`` integers, in
    ``[0, num_classes)`` when ``num_classes`` is given and the labels are concrete (inside ``jit``
    only the shapes can be checked; the data loaders check the values where data enters)."""
    shape = tuple(jnp.shape(images))
    if shape[:1] == (0,):
        raise ValueError(f"{where}: an empty batch (images of shape {shape}); give at least one "
                         "example")
    if input_shape and shape[1:] != tuple(input_shape):
        raise ValueError(f"{where}: images of shape {shape} do not fit the model's inputs of shape "
                         f"(batch, {', '.join(map(str, input_shape))})")
    if labels is None:
        return
    if tuple(jnp.shape(labels)) != shape[:1]:
        raise ValueError(f"{where}: labels of shape {tuple(jnp.shape(labels))} do not match images "
                         f"of shape {shape}: need one label per image, shape {shape[:1]}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"{where}: labels must be integer class indices, got dtype "
                         f"{jnp.result_type(labels)}")
    if not num_classes or not shape[0] or isinstance(labels, jax.core.Tracer):
        return
    low, high = int(jnp.min(labels)), int(jnp.max(labels))
    if low < 0 or high >= num_classes:
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}), got values from {low} "
                         f"to {high}")


cross_entropy = losses.cross_entropy


def _bound(axis_name: str | None) -> bool:
    """Whether ``axis_name`` is a mapped axis here (inside ``pmap`` / ``shard_map``)."""
    if axis_name is None:
        return False
    try:
        lax.axis_index(axis_name)
    except NameError:
        return False
    return True


def apply_with_rule(model, variables, images, train: bool, rngs: dict, collections=()):
    """``model.apply`` wired as in a train step, so that differentiating it follows the rule: the
    RNG streams ``rngs`` (``step_rngs``) and the DFA error taps (``pfa_jax.nn.TAPS``) mutable. In
    training mode BatchNorm normalises with the batch's statistics; its updated running statistics
    come back in the updates. ``collections``: further mutable collections. Returns
    ``(logits, updates)``."""
    return model.apply(variables, images, train=train, rngs=rngs,
                       mutable=["batch_stats", pnn.TAPS, *collections])


def train_step(state: TrainState, batch: dict, axis_name: str | None = AXIS):
    """One step of the state's rule on ``batch``. Pure.

    Under ``pmap`` / ``shard_map`` with ``axis_name`` bound, loss, gradients, feedback signals and
    BatchNorm statistics are averaged over that axis.

    Non-finite guard (as ``optax.apply_if_finite``, without its state): a step whose loss or any
    gradient or feedback signal is NaN or infinite (a NaN image, an out-of-range label under
    ``jit``, a diverging learning rate) changes nothing but ``step`` (params, feedback, BatchNorm
    statistics and optimizer state stay as they were) and says so in ``metrics['nonfinite']``
    (1.0; 0.0 for a step taken). ``train_epoch``'s per-step metrics carry it, so
    ``metrics['nonfinite'].sum()`` counts the skipped steps; ``pfa-jax train`` stops at the first
    one (``DivergenceError``), keeping the last good checkpoint.

    Args:
      state: a ``TrainState`` (``create_train_state``).
      batch: ``{'image': (n, ...), 'label': ...}`` (and what the state's loss reads).
      axis_name: the data-parallel axis averaged over where it is bound.

    Returns:
      ``(state, metrics)``: the stepped state, and ``loss``, the loss's aux metrics (``accuracy``
      for the default), ``nonfinite`` and the hyper-parameters the optimizer state holds
      (``pfa_jax.optim.hyperparameters``; a separate ``feedback_tx``'s prefixed ``feedback/``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="fa", widths=(16,))
      >>> batch = {"image": jnp.ones((4, 8, 8, 1)), "label": jnp.arange(4)}
      >>> state = pj.train.create_train_state(jax.random.key(0), model, batch, optax.sgd(0.1))
      >>> state, metrics = jax.jit(pj.train.train_step)(state, batch)
      >>> int(state.step), sorted(metrics)
      (1, ['accuracy', 'loss', 'nonfinite'])
    """
    state.check(batch["image"], batch["label"], "train_step")
    parallel = _bound(axis_name)
    model = state.model
    if parallel and hasattr(model, "axis_name"):
        model = model.clone(axis_name=axis_name)
    rngs = step_rngs(state)
    plastic = state.plastic_feedback()

    def loss_fn(params, plastic):
        variables = {"params": params, "feedback": player.merge(state.feedback, plastic),
                     "batch_stats": state.batch_stats}
        outputs, updates = apply_with_rule(model, variables, batch["image"], True, rngs)
        value, aux = losses.value_and_aux(state.loss, outputs, batch)
        return value, (aux, updates)

    (loss, (aux, updates)), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, plastic)
    if parallel:
        grads, loss, aux = lax.pmean((grads, loss, aux), axis_name)
    param_steps, param_opt = state.tx.update(grads[0], state.opt_state["params"], state.params)
    feedback_steps, feedback_opt = state.feedback_tx.update(grads[1], state.opt_state["feedback"],
                                                            plastic)
    metrics = {"loss": loss, **aux, **hyperparameters(param_opt)}
    if state.feedback_tx is not state.tx:
        metrics.update({f"feedback/{k}": v for k, v in hyperparameters(feedback_opt).items()})
    stepped = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, param_steps),
        feedback=player.merge(state.feedback, optax.apply_updates(plastic, feedback_steps)),
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state={"params": param_opt, "feedback": feedback_opt})
    if stepped.mirrored:
        stepped = mirror(stepped)
    finite = all_finite((loss, grads))
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    kept = {k: keep_if_not(finite, getattr(stepped, k), getattr(state, k))
            for k in ("params", "feedback", "batch_stats", "opt_state")}
    return stepped.replace(**kept), metrics


def all_finite(tree) -> jnp.ndarray:
    """Whether every array of ``tree`` holds only finite values (a boolean scalar)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def keep_if_not(finite, new, old):
    """``new`` where ``finite``, else ``old`` (elementwise over two trees of one structure)."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def eval_step(state: TrainState, batch: dict) -> dict:
    """The state's loss of the eval-mode model on ``batch``.

    Args:
      state: a ``TrainState``.
      batch: ``{'image', 'label'}``, optionally ``'mask'`` (1 for real examples, 0 for padding,
        which the default loss weights the examples by).

    Returns:
      ``loss``, its aux metrics (``accuracy`` for the default) and ``count``, the number of
      examples (the sum of ``batch['mask']`` where given).

    Example:
      >>> import jax, jax.numpy as jnp, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="kp", widths=(16,))
      >>> batch = {"image": jnp.ones((4, 8, 8, 1)), "label": jnp.arange(4),
      ...          "mask": jnp.array([1.0, 1.0, 1.0, 0.0])}
      >>> state = pj.train.create_train_state(jax.random.key(0), model, batch)
      >>> float(pj.train.eval_step(state, batch)["count"])
      3.0
    """
    state.check(batch["image"], batch["label"], "eval_step")
    outputs = state.model.apply(state.variables(), batch["image"], train=False)
    loss, aux = losses.value_and_aux(state.loss, outputs, batch)
    count = jnp.sum(batch["mask"]) if "mask" in batch else jnp.shape(batch["image"])[0]
    return {"loss": loss, **aux, "count": jnp.asarray(count, jnp.float32)}


def _on(x, sharding):
    """``x`` constrained to ``sharding`` (None: left to XLA)."""
    return x if sharding is None else lax.with_sharding_constraint(x, sharding)


def _epoch_batch_step(state: TrainState, step, images, labels, augment_key, *, augment: str,
                      sharding=None):
    """``train_step`` on batch ``i`` of an epoch, ``step = (i, indices)``: the rows ``indices``
    (placed by ``sharding``), augmented with ``fold_in(augment_key, i)``."""
    i, indices = step
    indices = _on(indices, sharding)
    batch_images = pfa_augment.apply(augment, jax.random.fold_in(augment_key, i), images[indices])
    return train_step(state, {"image": batch_images,
                              "label": jax.tree.map(lambda a: a[indices], labels)})


_epoch = loops.Loop(_epoch_batch_step, static_argnames=("augment", "sharding"), donate_carry=True)


def train_epoch(state: TrainState, images, labels, key, batch_size: int, augment: str = "none",
                loop: str = "auto", on_step: Callable[[int, dict], None] | None = None,
                sharding: NamedSharding | None = None):
    """One shuffled epoch of ``train_step``, dropping the last partial batch. ``state`` is donated:
    keep the returned one.

    Args:
      state: a ``TrainState``.
      images, labels: the whole split, ``(N, ...)`` and ``(N,)`` (or a tree of ``(N, ...)``).
      key: the epoch's key (its shuffle and augmentation).
      batch_size: examples per step.
      augment: a ``pfa_jax.augment`` recipe applied to each batch (``'none'``, ``'cifar'``, ...).
      loop: ``'scan'``, ``'steps'`` or ``'auto'`` (``pfa_jax.loops.resolve``).
      on_step: ``on_step(i, metrics)`` after each step of the ``'steps'`` loop (a progress bar; the
        scan's steps run inside one call, so it is not called there).
      sharding: places every batch (data parallel: ``NamedSharding(mesh, PartitionSpec("batch"))``
        with ``images``, ``labels`` and ``state`` replicated on ``mesh``, so each device gathers,
        augments and differentiates only its own rows); None: XLA's choice.

    Returns:
      ``(state, metrics)``: the state after the epoch, and ``train_step``'s metrics as arrays of
      length ``N // batch_size``, one value per step.

    Example:
      >>> import jax, jax.numpy as jnp, optax, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="fa", widths=(16,))
      >>> images, labels = jnp.ones((40, 8, 8, 1)), jnp.arange(40) % 10
      >>> state = pj.train.create_train_state(jax.random.key(0), model, images[:1], optax.sgd(0.1))
      >>> state, steps = pj.train.train_epoch(state, images, labels, jax.random.key(1), 16)
      >>> int(state.step), steps["loss"].shape
      (2, (2,))
    """
    pfa_augment.check(augment)
    state.check(images, labels, "train_epoch")
    loop = loops.resolve(loop, state.params)
    order = epoch_order(key, images.shape[0], batch_size)
    images, labels = jnp.asarray(images), jax.tree.map(jnp.asarray, labels)
    return _epoch(state, (jnp.arange(len(order)), order), images, labels,
                  jax.random.fold_in(key, 1), loop=loop, on_step=on_step, augment=augment,
                  sharding=sharding)


def epoch_order(key, count: int, batch_size: int) -> jax.Array:
    """An epoch's batches of example indices, ``(count // batch_size, batch_size)``: a
    permutation of ``range(count)`` from ``key``, the last partial batch dropped."""
    steps = count // batch_size
    if steps == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {count} training examples")
    return jax.random.permutation(key, count)[:steps * batch_size].reshape(steps, batch_size)


def _window_sums(state: TrainState, batch: dict) -> dict:
    """``eval_step``'s loss and aux metrics on ``batch``, each times its number of examples."""
    m = eval_step(state, batch)
    count = m.pop("count")
    return {name: value * count for name, value in m.items()}


def _eval_window(totals: dict, i, state: TrainState, images, labels, *, batch_size: int,
                 sharding=None):
    """``totals`` plus batch ``i``'s sums (``_window_sums``)."""
    window = lambda a: _on(lax.dynamic_slice_in_dim(a, i * batch_size, batch_size), sharding)
    sums = _window_sums(state, {"image": window(images), "label": jax.tree.map(window, labels)})
    return jax.tree.map(jnp.add, totals, sums), None


_evaluation = loops.Loop(_eval_window, static_argnames=("batch_size", "sharding"))
_rest_sums = jax.jit(_window_sums)


def evaluate(state: TrainState, images, labels, batch_size: int = 1000, loop: str = "auto",
             sharding: NamedSharding | None = None) -> dict:
    """The state's loss of the eval-mode model over a whole split: ``N // batch_size`` batches of
    ``batch_size``, then the rest as one smaller batch, so every loss sees only real examples.

    Args:
      state: a ``TrainState``.
      images, labels: the split, ``(N, ...)`` and ``(N,)`` (or a tree of ``(N, ...)``).
      batch_size: examples per evaluated batch.
      loop: ``'scan'``, ``'steps'`` or ``'auto'`` (``pfa_jax.loops.resolve``).
      sharding: places every batch, as in ``train_epoch``.

    Returns:
      The loss and its aux metrics (``accuracy`` for the default loss), means over the ``N``
      examples.

    Example:
      >>> import jax, jax.numpy as jnp, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="bp", widths=(16,))
      >>> images, labels = jnp.ones((25, 8, 8, 1)), jnp.zeros(25, jnp.int32)
      >>> state = pj.train.create_train_state(jax.random.key(0), model, images[:1])
      >>> result = pj.train.evaluate(state, images, labels, batch_size=10)  # 10 + 10 + 5
      >>> sorted(result), float(result["accuracy"]) in (0.0, 1.0)
      (['accuracy', 'loss'], True)
    """
    state.check(images, labels, "evaluate")
    loop = loops.resolve(loop, state.params)
    images, labels = jnp.asarray(images), jax.tree.map(jnp.asarray, labels)
    n = images.shape[0]
    steps = n // batch_size
    first = {"image": images[:batch_size], "label": jax.tree.map(lambda a: a[:batch_size], labels)}
    shapes = jax.eval_shape(_window_sums, state, first)
    totals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if steps:
        totals, _ = _evaluation(totals, jnp.arange(steps), state, images, labels,
                                loop=loop, batch_size=batch_size, sharding=sharding)
    if n > steps * batch_size:
        rest = {"image": images[steps * batch_size:],
                "label": jax.tree.map(lambda a: a[steps * batch_size:], labels)}
        totals = jax.tree.map(jnp.add, totals, _rest_sums(state, rest))
    return jax.tree.map(lambda t: t / n, totals)


# -- data parallel ---------------------------------------------------------------------------------
def replicate(tree, devices=None):
    """Copies ``tree`` onto every local device along a new leading axis (for ``pmap``)."""
    devices = devices or jax.local_devices()
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(devices),) + jnp.shape(x)), tree)
    return shard_batch(stacked, batch_mesh(devices))


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch, num_devices: int | None = None):
    """``(n, ...) -> (devices, n / devices, ...)`` for ``pmap``."""
    num_devices = num_devices or jax.local_device_count()

    def split(x):
        if x.shape[0] % num_devices:
            raise ValueError(f"batch of {x.shape[0]} does not split evenly over {num_devices} devices")
        return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

    return jax.tree.map(split, batch)


def batch_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: all)."""
    return jax.sharding.Mesh(np.asarray(devices or jax.devices()), (AXIS,))


def shard_batch(batch, mesh: jax.sharding.Mesh):
    """Places a batch split along its leading axis over ``mesh``'s ``"batch"`` axis."""
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(AXIS)))


def replicate_on(tree, mesh: jax.sharding.Mesh):
    """Places ``tree`` fully replicated on ``mesh`` (the state for batch-sharded ``jit``), also a
    mesh over several processes' devices: typed PRNG keys (which ``jax.device_put`` does not send
    to other processes' devices) travel as their raw key data and are wrapped again."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), sharding),
                                            impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)
