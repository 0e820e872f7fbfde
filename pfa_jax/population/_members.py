"""A population's members: ``Population``, built (``create``) or stacked (``stack``) from single
states, and each member again as its single run's state (``member``)."""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from pfa_jax import rules, train


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


@functools.partial(jax.jit, static_argnums=1)
def _sliced(tree, i: int):
    """Member ``i`` of every array of ``tree`` (one compiled call for the whole tree)."""
    return jax.tree.map(lambda x: x[i], tree)
