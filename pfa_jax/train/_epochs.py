"""Compiled epochs: ``train_epoch`` (one shuffled epoch of ``train_step``) and ``evaluate``."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding

from pfa_jax import augment as pfa_augment
from pfa_jax import loops
from pfa_jax.train._state import TrainState
from pfa_jax.train._steps import eval_step, train_step


def _on(x, sharding):
    """``x`` constrained to ``sharding`` (None: left to XLA)."""
    return x if sharding is None else lax.with_sharding_constraint(x, sharding)


def epoch_batch_step(state: TrainState, step, images, labels, augment_key, *, augment: str,
                      sharding=None):
    """``train_step`` on batch ``i`` of an epoch, ``step = (i, indices)``: the rows ``indices``
    (placed by ``sharding``), augmented with ``fold_in(augment_key, i)``."""
    i, indices = step
    indices = _on(indices, sharding)
    batch_images = pfa_augment.apply(augment, jax.random.fold_in(augment_key, i), images[indices])
    return train_step(state, {"image": batch_images,
                              "label": jax.tree.map(lambda a: a[indices], labels)})


_epoch = loops.Loop(epoch_batch_step, static_argnames=("augment", "sharding"), donate_carry=True)


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
