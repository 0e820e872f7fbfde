"""Populations: ``P`` members of one model, rule and optimizer trained as one program.

A ``Population`` is the members' ``TrainState``s stacked on a leading member axis, stepped by
``pfa_jax.train``'s own step, so every member takes exactly the steps of its single run (to float32
rounding). Members differ in their key (parameters, feedback, RNG streams), in the optimizer's
scalar hyper-parameters (``tx`` is then a factory ``tx(**hyperparams)``, called again with traced
scalars inside every compiled step, so it must use ``jnp`` arithmetic only, as optax's aliases do),
in each epoch's shuffle (one epoch key each) and in a rule's init-only options
(``pfa_jax.rules.Rule.init_only``: the soft alignment ``rho``, which shapes only the feedback drawn
at init; ``stack`` the members' states, each created with its own model). The model and every other
rule option are one program: members that differ there are different populations (``stack``
refuses them).

``strategy``: ``"vmap"`` (``jax.vmap`` of the step over the members inside one ``jit``: what fills
an accelerator) or ``"sequential"`` (the members one after another through one compiled
single-member step or epoch, shared by all: on CPU, where vmap measured slower); ``"auto"``
(``resolve``) is ``"sequential"`` on CPU and ``"vmap"`` elsewhere. Results carry the member axis
first. ``train_step`` and ``train_epoch`` donate the population passed in unless ``donate=False``.
``shard`` lays the member axis over a mesh's ``"member"`` axis (``mesh``). The repository's
``docs/populations.md`` has the whole story and the measurements.

Example:

>>> import jax, optax, pfa_jax as pj
>>> model = pj.models.get("ffn2", rule="pfa", widths=(16,))
>>> images, labels = jax.numpy.ones((8, 28, 28, 1)), jax.numpy.arange(8) % 10
>>> pop = pj.population.create(jax.random.split(jax.random.key(0), 3), model, images[:1],
...                            optax.sgd, learning_rate=[0.1, 0.05, 0.01], momentum=0.9)
>>> pop.size
3
>>> pop, metrics = pj.population.train_step(pop, {"image": images, "label": labels})
>>> metrics["loss"].shape
(3,)
>>> pj.population.evaluate(pop, images, labels)["accuracy"].shape
(3,)
>>> pop.hyperparams["learning_rate"]
Array([0.1 , 0.05, 0.01], dtype=float32)
>>> pj.population.member(pop, 2).step  # a single run's TrainState
Array(1, dtype=int32)
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from pfa_jax import augment as pfa_augment
from pfa_jax import loops, rules, train
from pfa_jax.train._epochs import epoch_batch_step, epoch_order

__all__ = ["apply", "create", "evaluate", "member", "mesh", "MEMBER", "Population", "shard", "stack",
           "resolve", "STRATEGIES", "train_epoch", "train_step"]

MEMBER = "member"  # the mesh axis the member axis is laid over
STRATEGIES = ("auto", "vmap", "sequential")


class Population(struct.PyTreeNode):
    """``state``: one ``TrainState`` whose arrays have the member axis first (static fields shared);
    ``hyperparams``: name -> each member's value ``(P, ...)`` (a scalar, or a vector such as a
    schedule's per-segment rates); ``make_tx``: the factory of the members'
    transformations (None: ``state.tx`` for all); ``statics``: each member's own ``(model, layers)``
    where they differ in init-only rule options (empty: ``state``'s for all)."""

    state: train.TrainState
    hyperparams: dict
    make_tx: Callable[..., optax.GradientTransformation] | None = struct.field(
        pytree_node=False, default=None)
    statics: tuple = struct.field(pytree_node=False, default=())

    @property
    def size(self) -> int:
        return int(jax.tree.leaves(self.state.params)[0].shape[0])


@jax.jit
def _stacked(trees: list):
    """The trees' arrays stacked on a new leading (member) axis, in one compiled call."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _members(hyperparams: dict, size: int) -> list[dict]:
    """Each member's hyper-parameters: a sequence gives one value per member, a scalar all of them."""
    values = {}
    for name, value in hyperparams.items():
        column = np.asarray(value)
        if column.ndim > 1 or (column.ndim == 1 and len(column) != size):
            raise ValueError(f"population: {name}={value!r} must be a scalar or one value per "
                             f"member ({size})")
        values[name] = np.broadcast_to(column, (size,))
    return [{name: column[i].item() for name, column in values.items()} for i in range(size)]


def create(keys: jax.Array, model, sample_batch, tx=None, *, feedback_tx=None, rng_streams=None,
           loss=None, **hyperparams) -> Population:
    """``len(keys)`` members, member ``i`` exactly ``pfa_jax.train.create_train_state(keys[i],
    model, sample_batch, tx_i, ...)`` with ``tx_i = tx(**hyperparams_i)``.

    Args:
      keys: one key per member, ``(P,)``.
      model, sample_batch, feedback_tx, rng_streams, loss: as for ``create_train_state``, shared.
      tx: with ``hyperparams``, a factory of them (module docstring: ``jnp`` arithmetic only);
        without, what ``create_train_state`` takes, shared by every member.
      **hyperparams: each a scalar (every member) or a sequence with one value per member.

    Returns:
      The ``Population``: the members' states stacked on a leading member axis.

    Example:
      >>> import jax, jax.numpy as jnp, optax, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="kp", widths=(16,))
      >>> pop = pj.population.create(jax.random.split(jax.random.key(0), 2), model,
      ...                            jnp.ones((1, 8, 8, 1)), optax.sgd, learning_rate=[0.1, 0.01])
      >>> pop.size, pop.hyperparams["learning_rate"].shape
      (2, (2,))
    """
    keys = jnp.asarray(keys)
    if keys.ndim != 1 or not keys.shape[0]:
        raise ValueError(f"population: keys of shape {keys.shape}; give one key per member")
    per_member = _members(hyperparams, keys.shape[0])
    if hyperparams and (isinstance(tx, optax.GradientTransformation) or not callable(tx)):
        raise ValueError(f"population: hyper-parameters {sorted(hyperparams)} are given per "
                         "member, so tx must be a factory tx(**hyperparams) such as optax.sgd, "
                         f"not {tx!r}")
    states = [train.create_train_state(key, model, sample_batch, tx(**h) if hyperparams else tx,
                                       feedback_tx=feedback_tx, rng_streams=rng_streams, loss=loss)
              for key, h in zip(keys, per_member)]
    columns = {name: [h[name] for h in per_member] for name in hyperparams}
    return stack(states, columns, make_tx=tx if hyperparams else None)


def stack(states: Sequence[train.TrainState], hyperparams: dict | None = None,
          make_tx: Callable | None = None) -> Population:
    """The population of single ``states`` (of one model; their ``tx`` built by ``make_tx`` from
    each member's ``hyperparams``, or all one ``tx``): ``create`` without the creation, for states
    made elsewhere (restored from checkpoints, say)."""
    first = states[0]
    for i, state in enumerate(states[1:], 1):
        if _program(state.model) != _program(first.model) or state.loss is not first.loss:
            raise ValueError(f"population: member {i}'s model or loss differs from member 0's; "
                             "members of one population share the model, its rule and the loss "
                             "(all but the rule's init-only options, such as rho)")
        if make_tx is None and state.tx is not first.tx:
            raise ValueError(f"population: member {i} has another optimizer than member 0; give "
                             "per-member hyper-parameters with make_tx, or one tx to all")
    shared = [s.replace(model=first.model, layers=first.layers, tx=first.tx,
                        feedback_tx=first.tx if s.feedback_tx is s.tx else s.feedback_tx)
              for s in states]
    stacked = _stacked(shared)
    columns = {name: jnp.asarray(values) for name, values in (hyperparams or {}).items()}
    statics = tuple((s.model, s.layers) for s in states)
    return Population(state=stacked, hyperparams=columns, make_tx=make_tx,
                      statics=statics if len(set(statics)) > 1 else ())


def _stepping(spec):
    """A rule spec (a rule, a name, or a mapping of them) with every rule's init-only options at
    their defaults (``Rule.stepping``)."""
    if isinstance(spec, rules.Rule):
        return spec.stepping()
    if isinstance(spec, Mapping):
        return type(spec)({k: _stepping(v) for k, v in spec.items()})
    return spec


def _program(model):
    """``model`` as its training steps run it: its rules without their init-only options."""
    rule = getattr(model, "rule", None)
    return model.clone(rule=_stepping(rule)) if rule is not None else model


def _with_tx(make_tx, state: train.TrainState, hyperparams: dict) -> train.TrainState:
    """One member's state with its own ``tx`` (traced hyper-parameters inside a compiled step)."""
    if make_tx is None:
        return state
    tx = make_tx(**hyperparams)
    own = state.feedback_tx is state.tx
    return state.replace(tx=tx, feedback_tx=tx if own else state.feedback_tx)


def member(population: Population, i: int) -> train.TrainState:
    """Member ``i`` as the ``TrainState`` of its single run (its own ``tx`` and model)."""
    state = _sliced(population.state, i)
    if population.statics:
        model, layers = population.statics[i]
        state = state.replace(model=model, layers=layers)
    return _with_tx(population.make_tx, state,
                    {k: np.asarray(v[i]).tolist() for k, v in population.hyperparams.items()})


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


@functools.partial(jax.jit, static_argnums=1)
def _sliced(tree, i: int):
    """Member ``i`` of every array of ``tree`` (one compiled call for the whole tree)."""
    return jax.tree.map(lambda x: x[i], tree)


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


def mesh(members: int, batch: int = 1, devices=None) -> jax.sharding.Mesh:
    """A mesh of ``members x batch`` devices with axes ``("member", "batch")``."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if devices.size != members * batch:
        raise ValueError(f"population.mesh: {members} x {batch} does not use the {devices.size} "
                         "devices; give members * batch == the number of devices")
    return jax.sharding.Mesh(devices.reshape(members, batch), (MEMBER, train.AXIS))


def shard(population: Population, mesh: jax.sharding.Mesh) -> Population:
    """``population`` with its member axis laid over ``mesh``'s ``"member"`` axis (the member count
    a multiple of that axis's size)."""
    ways = mesh.shape[MEMBER]
    if population.size % ways:
        raise ValueError(f"population.shard: {population.size} members do not split over "
                         f"{ways} devices of the mesh's {MEMBER!r} axis")
    return jax.device_put(population, NamedSharding(mesh, PartitionSpec(MEMBER)))
