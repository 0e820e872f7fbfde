"""One compiled step, epoch and evaluation of every member, by ``vmap`` or one after another."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pfa_jax import augment as pfa_augment
from pfa_jax import loops, train
from pfa_jax.train._epochs import epoch_batch_step, epoch_order
from pfa_jax.population._members import Population, _stacked, _sliced, _with_tx, member

STRATEGIES = ("auto", "vmap", "sequential")


def _member_step(make_tx, state, hyperparams, batch):
    """``train.train_step`` of one member under its own ``tx``; the result carries the shared
    static ``tx`` back (no traced transformation leaves a compiled step)."""
    new, metrics = train.train_step(_with_tx(make_tx, state, hyperparams), batch)
    return new.replace(tx=state.tx, feedback_tx=state.feedback_tx), metrics


def _member_epoch_step(state, step, images, labels, augment_key, hyperparams, *, make_tx,
                       augment: str):
    """One member's step ``step = (i, indices)`` of its epoch (``train_epoch``'s own body)."""
    new, metrics = epoch_batch_step(_with_tx(make_tx, state, hyperparams), step, images,
                                           labels, augment_key, augment=augment)
    return new.replace(tx=state.tx, feedback_tx=state.feedback_tx), metrics


def resolve(name: str = "auto") -> str:
    """``"vmap"`` or ``"sequential"`` for ``name`` (module docstring): ``"auto"`` is
    ``"sequential"`` on CPU, ``"vmap"`` on accelerators."""
    if name not in STRATEGIES:
        raise ValueError(f"population: strategy={name!r} is unknown; valid: {', '.join(STRATEGIES)}")
    if name != "auto":
        return name
    return "sequential" if jax.default_backend() == "cpu" else "vmap"


def _vmapped_step(population: Population, batch, batch_axis):
    states, metrics = jax.vmap(functools.partial(_member_step, population.make_tx),
                               in_axes=(0, 0, batch_axis))(population.state,
                                                           population.hyperparams, batch)
    return population.replace(state=states), metrics


_step = {donate: jax.jit(_vmapped_step, static_argnums=2, donate_argnums=(0,) * donate)
         for donate in (True, False)}
_one_step = jax.jit(_member_step, static_argnums=0)


def _restacked(population: Population, results: list, donate: bool):
    """The members' ``(state, metrics)`` stacked again; with ``donate`` the old population's
    buffers are deleted (as a donating compiled call would)."""
    states, metrics = _stacked(results)
    if donate:
        for leaf in jax.tree.leaves(population.state):
            leaf.delete()
    return population.replace(state=states), metrics


def train_step(population: Population, batch: dict, *, per_member: bool = False,
               donate: bool = True, strategy: str = "auto"):
    """One ``pfa_jax.train.train_step`` of every member; returns ``(population, metrics)`` with
    metrics ``(P,)``. ``batch``: one batch for all members, or (``per_member``) arrays with the
    member axis first. ``donate``: the population passed in is deleted; ``strategy``: module
    docstring."""
    if resolve(strategy) == "vmap":
        return _step[donate](population, batch, 0 if per_member else None)
    return _restacked(population, [
        _one_step(population.make_tx, _sliced(population.state, i),
                  _sliced(population.hyperparams, i), _sliced(batch, i) if per_member else batch)
        for i in range(population.size)], donate)


def _epoch_body(population: Population, step, images, labels, augment_key, *, augment: str):
    """Every member's step ``i`` of its own shuffle (``step = (i, indices)``, ``indices: (P,
    batch)``, ``augment_key: (P,)``)."""
    i, indices = step
    one = functools.partial(_member_epoch_step, make_tx=population.make_tx, augment=augment)
    states, metrics = jax.vmap(lambda state, indices, key, h: one(
        state, (i, indices), images, labels, key, h))(population.state, indices, augment_key,
                                                      population.hyperparams)
    return population.replace(state=states), metrics


_epochs = {donate: loops.Loop(_epoch_body, static_argnames=("augment",), donate_carry=donate)
           for donate in (True, False)}
_member_epoch = loops.Loop(_member_epoch_step, static_argnames=("make_tx", "augment"),
                           donate_carry=True)


def train_epoch(population: Population, images, labels, keys: jax.Array, batch_size: int,
                augment: str = "none", loop: str = "auto", donate: bool = True,
                strategy: str = "auto"):
    """One epoch of every member, member ``i`` exactly ``pfa_jax.train.train_epoch(member_i,
    images, labels, keys[i], batch_size, augment)``: its own shuffle and augmentation from its
    epoch key. Returns ``(population, metrics)``, metrics ``(P, steps)`` arrays. ``donate`` and
    ``strategy`` as in ``train_step``."""
    pfa_augment.check(augment)
    population.state.check(images, labels, "population.train_epoch")
    keys = jnp.asarray(keys)
    if keys.shape[:1] != (population.size,):
        raise ValueError(f"population.train_epoch: {keys.shape[:1]} epoch keys for "
                         f"{population.size} members; give one key per member")
    order = jax.vmap(lambda k: epoch_order(k, images.shape[0], batch_size))(keys)
    steps = order.shape[1]
    images, labels = jnp.asarray(images), jax.tree.map(jnp.asarray, labels)
    augment_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    loop = loops.resolve(loop, _sliced(population.state.params, 0))  # a member's kernels
    if resolve(strategy) == "sequential":
        return _restacked(population, [_member_epoch(
            _sliced(population.state, i), (jnp.arange(steps), order[i]),
            images, labels, augment_keys[i], _sliced(population.hyperparams, i), loop=loop,
            make_tx=population.make_tx, augment=augment) for i in range(population.size)], donate)
    population, metrics = _epochs[donate](
        population, (jnp.arange(steps), jnp.swapaxes(order, 0, 1)), images, labels, augment_keys,
        loop=loop, augment=augment)
    return population, jax.tree.map(lambda m: jnp.swapaxes(m, 0, 1), metrics)


def evaluate(population: Population, images, labels, batch_size: int = 1000,
             loop: str = "auto", strategy: str = "auto") -> dict:
    """``pfa_jax.train.evaluate`` of every member: each metric a ``(P,)`` array."""
    def one(state):
        return train.evaluate(state, images, labels, batch_size, loop)

    if resolve(strategy) == "vmap":
        return jax.vmap(one)(population.state)
    return _stacked([one(_sliced(population.state, i)) for i in range(population.size)])


def apply(fn: Callable[..., Any], population: Population, *args, **kwargs):
    """``fn(member_i, *args, **kwargs)`` for every member, results stacked on a leading member axis
    (any metric of ``pfa_jax.metrics``, a checkpoint writer, ...)."""
    return _stacked([fn(member(population, i), *args, **kwargs) for i in range(population.size)])
