"""Training state and pure steps: ``create_train_state``, ``train_step``, ``eval_step``, compiled epochs,
and data parallelism.

One step is one ``jax.value_and_grad`` of the mean cross-entropy over ``(params, feedback)``; the rules'
custom VJPs make the feedback gradients their feedback-learning signals. Both are stepped by one optax
transformation (``pfa_jax.optim``) that leaves fixed feedback bit-identical. Weight-mirror feedback
is stepped by ``mirror`` instead: a mirroring phase in ``create_train_state`` and mirror steps after
every training step. DFA layers get the output error through taps the model adds to its logits.

Data parallel, two ways, same numbers as one device:

* ``jax.pmap(train_step, axis_name="batch")`` on replicated state (``replicate``) and a batch split on
  its leading axis (``split_batch``): inside, ``train_step`` sees the bound axis ``"batch"`` and averages
  loss, gradients and feedback signals with ``lax.pmean``; BatchNorm statistics are averaged across
  devices too (the model is cloned with ``axis_name``), so it equals one big batch.
* ``jax.jit(train_step)`` with the batch sharded over a device mesh (``shard_batch``, a
  ``NamedSharding`` over axis ``"batch"``) and the state replicated: XLA partitions the same program.

Models are called as ``model.apply(variables, images, train=bool)`` (the ``pfa_jax.models``
convention); a model with an ``axis_name`` field gets it set under ``pmap``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from pfa_jax import augment as pfa_augment
from pfa_jax import nn as pnn
from pfa_jax.optim import OptimizerConfig, make_optimizer

AXIS = "batch"


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    feedback: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    model: nn.Module = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    config: OptimizerConfig = struct.field(pytree_node=False)
    input_shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    mirrored: bool = struct.field(pytree_node=False, default=False)  # has weight-mirror feedback

    def variables(self) -> dict:
        return {"params": self.params, "feedback": self.feedback, "batch_stats": self.batch_stats}


def create_train_state(key: jax.Array, model: nn.Module, sample_batch, optimizer_config=None
                       ) -> TrainState:
    """Initialises ``model`` on ``sample_batch`` (a batch dict with ``'image'``, or an image array).

    ``optimizer_config``: an ``OptimizerConfig``, a mapping or a ConfigDict (see ``pfa_jax.optim``).
    """
    config = OptimizerConfig.create(optimizer_config)
    images = sample_batch["image"] if isinstance(sample_batch, dict) else sample_batch
    init_key, feedback_key, state_key = jax.random.split(key, 3)
    variables = jax.jit(functools.partial(model.init, train=False))(
        {"params": init_key, "feedback": feedback_key}, jnp.asarray(images))
    params = variables["params"]
    pnn.check_rule_map(getattr(model, "rule", None), params)
    feedback = variables.get("feedback", {})
    plastic = variables.get(pnn.PLASTICITY, {})
    labels = {"params": jax.tree.map(lambda _: "params", params),
              "feedback": jax.tree.map(lambda c: "feedback" if c == pnn.OPTIMIZED else "frozen",
                                       plastic)}
    tx = make_optimizer(config, labels)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, feedback=feedback,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init({"params": params, "feedback": feedback}),
        rng=state_key, model=model, tx=tx, config=config, input_shape=tuple(images.shape[1:]),
        mirrored=any(c == pnn.MIRRORED for c in jax.tree.leaves(plastic)))
    if state.mirrored:
        state = jax.jit(mirror, static_argnames="warmup")(state, warmup=True)
    return state


def mirror(state: TrainState, warmup: bool = False) -> TrainState:
    """Weight-mirror layers take their mirror steps (``warmup``: the initial mirroring phase).

    Each step feeds noise through the layer's own kernel (``pfa_jax.rules.weight_mirror``), drawn
    from a key derived from ``state.rng`` and ``state.step`` (so repeated calls at one step repeat
    the same noise); the model's forward pass on one zero image only carries the layers there and
    is otherwise unused.
    """
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
    images = jnp.zeros((1,) + tuple(state.input_shape), jnp.float32)
    _, updates = state.model.apply(state.variables(), images, train=False, mutable=["feedback"],
                                   rngs={pnn.MIRROR_WARMUP if warmup else pnn.MIRROR: key})
    return state.replace(feedback=updates["feedback"])


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _bound(axis_name: str | None) -> bool:
    """Whether ``axis_name`` is a mapped axis here (inside ``pmap`` / ``shard_map``)."""
    if axis_name is None:
        return False
    try:
        lax.axis_index(axis_name)
    except NameError:
        return False
    return True


def apply_with_rule(model, variables, images, train: bool, key, collections=()):
    """``model.apply`` wired as in a train step, so that differentiating it follows the rule: the
    ``feedback`` RNG stream (``key``; rules that redraw feedback per step need it) and the DFA error
    taps (``pfa_jax.nn.TAPS``) mutable. In training mode BatchNorm normalises with the batch's
    statistics; its updated running statistics come back in the updates. ``collections``: further
    mutable collections. Returns ``(logits, updates)``."""
    logits, updates = model.apply(variables, images, train=train, rngs={"feedback": key},
                                  mutable=["batch_stats", pnn.TAPS, *collections])
    taps = updates.get(pnn.TAPS, {})
    if taps and "consumed" not in taps:
        raise ValueError("the model has DFA layers but does not add their error taps to its "
                         "logits: end its __call__ with pfa_jax.nn.add_taps(self, logits)")
    return logits, updates


def train_step(state: TrainState, batch: dict, axis_name: str | None = AXIS):
    """One step on ``batch = {'image': (n, ...), 'label': (n,)}``; returns ``(state, metrics)``.

    Pure. Under ``pmap`` / ``shard_map`` with ``axis_name`` bound, loss, gradients, feedback signals
    and BatchNorm statistics are averaged over that axis.
    """
    parallel = _bound(axis_name)
    model = state.model
    if parallel and hasattr(model, "axis_name"):
        model = model.clone(axis_name=axis_name)
    step_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params, feedback):
        variables = {"params": params, "feedback": feedback, "batch_stats": state.batch_stats}
        logits, updates = apply_with_rule(model, variables, batch["image"], True, step_key)
        return cross_entropy(logits, batch["label"]).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, state.feedback)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    if parallel:
        grads, loss, accuracy = lax.pmean((grads, loss, accuracy), axis_name)
    trainable = {"params": state.params, "feedback": state.feedback}
    steps, opt_state = state.tx.update({"params": grads[0], "feedback": grads[1]},
                                       state.opt_state, trainable)
    new = optax.apply_updates(trainable, steps)
    lr, wd = state.config.schedules()
    metrics = {"loss": loss, "accuracy": accuracy, "learning_rate": lr(state.step),
               "weight_decay": wd(state.step)}
    state = state.replace(step=state.step + 1, params=new["params"], feedback=new["feedback"],
                          batch_stats=updates.get("batch_stats", state.batch_stats),
                          opt_state=opt_state)
    if state.mirrored:
        state = mirror(state)
    return state, metrics


def eval_step(state: TrainState, batch: dict) -> dict:
    """Mean loss and accuracy on ``batch``; an optional ``batch['mask']`` weights the examples."""
    logits = state.model.apply(state.variables(), batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(logits.shape[:1], logits.dtype))
    count = jnp.sum(mask)
    loss = jnp.sum(cross_entropy(logits, batch["label"]) * mask) / count
    accuracy = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask) / count
    return {"loss": loss, "accuracy": accuracy, "count": count}


LOOPS = ("auto", "scan", "steps")


def resolve_loop(loop: str, state: TrainState) -> str:
    """How ``train_epoch``, ``noise_pretrain`` and ``evaluate`` run their steps: ``"scan"`` compiles
    them all as one ``lax.scan`` (one dispatch), ``"steps"`` calls one compiled step per batch from
    Python. ``"auto"`` is ``"steps"`` on CPU for a model with convolutions (a rank-4 kernel among
    ``state.params``), where XLA runs convolutions inside a loop body about 25x slower than the same
    convolutions outside one (jax-ml/jax#12868; a ResNet-20 step at batch 128: 17.4 s in a scan,
    0.74 s alone, ``benchmarks/epoch_loop.py``), and ``"scan"`` otherwise (an MLP's scan is about 10 %
    faster on CPU). Both run the same steps in the same order with the same keys."""
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; valid loops: {', '.join(LOOPS)}")
    if loop != "auto":
        return loop
    convolutional = any(jnp.ndim(kernel) == 4 for kernel in jax.tree.leaves(state.params))
    return "steps" if convolutional and jax.default_backend() == "cpu" else "scan"


def stack_steps(per_step: list) -> Any:
    """Per-step metric dicts stacked into one dict of arrays with a leading step axis."""
    return jax.tree.map(lambda *values: jnp.stack(values), *per_step)


def _epoch_batch_step(state: TrainState, images, labels, indices, i, augment_key, augment: str):
    """``train_step`` on batch ``i`` of an epoch: the rows ``indices``, augmented with
    ``fold_in(augment_key, i)``."""
    batch_images = pfa_augment.apply(augment, jax.random.fold_in(augment_key, i), images[indices])
    return train_step(state, {"image": batch_images, "label": labels[indices]})


_epoch_step = jax.jit(_epoch_batch_step, static_argnames=("augment",), donate_argnums=(0,))


@functools.partial(jax.jit, static_argnames=("augment",), donate_argnums=(0,))
def _epoch_scan(state, images, labels, order, augment_key, augment: str):
    def body(state, step):
        i, indices = step
        return _epoch_batch_step(state, images, labels, indices, i, augment_key, augment)

    return lax.scan(body, state, (jnp.arange(order.shape[0]), order))


def train_epoch(state: TrainState, images, labels, key, batch_size: int, augment: str = "none",
                loop: str = "auto", on_step: Callable[[int, dict], None] | None = None):
    """One shuffled epoch of ``train_step`` (drops the last partial batch); ``augment`` names a
    ``pfa_jax.augment`` recipe applied to each batch; ``loop`` as in ``resolve_loop``. ``state`` is
    donated. Returns the state and per-step metrics (arrays of length ``len(images) // batch_size``).
    ``on_step(i, metrics)`` is called after each step of the ``"steps"`` loop (a progress bar; the
    scan's steps run inside one call, so it is not called there).
    """
    pfa_augment.check(augment)
    loop = resolve_loop(loop, state)
    steps = images.shape[0] // batch_size
    if steps == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {images.shape[0]} training examples")
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    order = jax.random.permutation(key, images.shape[0])[:steps * batch_size].reshape(steps, batch_size)
    augment_key = jax.random.fold_in(key, 1)
    if loop == "scan":
        return _epoch_scan(state, images, labels, order, augment_key, augment)
    per_step = []
    for i in range(steps):
        state, metrics = _epoch_step(state, images, labels, order[i], i, augment_key, augment)
        per_step.append(metrics)
        if on_step is not None:
            on_step(i, metrics)
    return state, stack_steps(per_step)


def _noise_batch_step(state: TrainState, key, batch_size: int, num_classes: int):
    """``train_step`` on ``N(0, 1)`` images with uniformly random labels drawn from ``key``."""
    image_key, label_key = jax.random.split(key)
    return train_step(state, {
        "image": jax.random.normal(image_key, (batch_size,) + tuple(state.input_shape)),
        "label": jax.random.randint(label_key, (batch_size,), 0, num_classes)})


_noise_step = jax.jit(_noise_batch_step, static_argnames=("batch_size", "num_classes"))


@functools.partial(jax.jit, static_argnames=("batch_size", "num_classes"))
def _noise_scan(state: TrainState, keys, batch_size: int, num_classes: int):
    return lax.scan(lambda s, k: _noise_batch_step(s, k, batch_size, num_classes), state, keys)


@jax.jit
def _restart_optimizer(state: TrainState) -> TrainState:
    fresh = state.tx.init({"params": state.params, "feedback": state.feedback})
    return state.replace(step=jnp.zeros_like(state.step), opt_state=fresh)


def noise_pretrain(state: TrainState, key, steps: int, batch_size: int, num_classes: int,
                   loop: str = "auto"):
    """Noise pretraining (Cheon, Lee & Paik, NeurIPS 2024): ``steps`` train steps with the rule on
    ``N(0, 1)`` images shaped like the data (``state.input_shape``, i.e. in the standardised pixel
    space) with uniformly random labels in ``0..num_classes-1``, before any data.

    The parameters, feedback and BatchNorm statistics it reaches are kept; the optimizer then starts
    afresh (new optimizer state, ``step = 0``), so the data phase runs its usual learning-rate and
    weight-decay schedule from its first epoch. ``loop`` as in ``resolve_loop``. Returns
    ``(state, per-step metrics)``.
    """
    keys = jax.random.split(key, steps)
    if resolve_loop(loop, state) == "scan":
        state, metrics = _noise_scan(state, keys, batch_size, num_classes)
    else:
        per_step = []
        for step_key in keys:
            state, step_metrics = _noise_step(state, step_key, batch_size, num_classes)
            per_step.append(step_metrics)
        metrics = stack_steps(per_step)
    return _restart_optimizer(state), metrics


def _eval_window(state: TrainState, images, labels, mask, i, batch_size: int) -> dict:
    """Batch ``i``'s loss and accuracy sums (masked rows excluded)."""
    window = lambda a: lax.dynamic_slice_in_dim(a, i * batch_size, batch_size)
    m = eval_step(state, {"image": window(images), "label": window(labels), "mask": window(mask)})
    return {"loss": m["loss"] * m["count"], "accuracy": m["accuracy"] * m["count"]}


_eval_step_sums = jax.jit(_eval_window, static_argnames=("batch_size",))


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _eval_scan(state: TrainState, images, labels, mask, batch_size: int) -> dict:
    def body(totals, i):
        sums = _eval_window(state, images, labels, mask, i, batch_size)
        return jax.tree.map(jnp.add, totals, sums), None

    steps = images.shape[0] // batch_size
    return lax.scan(body, {"loss": 0.0, "accuracy": 0.0}, jnp.arange(steps))[0]


def evaluate(state: TrainState, images, labels, batch_size: int = 1000, loop: str = "auto") -> dict:
    """Loss and accuracy over a whole split (the last batch is padded and masked); ``loop`` as in
    ``resolve_loop``."""
    n = images.shape[0]
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    images = jnp.pad(jnp.asarray(images), [(0, pad)] + [(0, 0)] * (images.ndim - 1))
    labels = jnp.pad(jnp.asarray(labels), (0, pad))
    mask = (jnp.arange(steps * batch_size) < n).astype(jnp.float32)
    if resolve_loop(loop, state) == "scan":
        totals = _eval_scan(state, images, labels, mask, batch_size)
    else:
        totals = jax.tree.map(lambda *sums: sum(sums), *[
            _eval_step_sums(state, images, labels, mask, i, batch_size) for i in range(steps)])
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
