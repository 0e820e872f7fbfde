"""Any NNX model as a linen module, so that every ``pfa_jax.metrics`` function measures it.

    state = pj.nnx.linen_state(model)                 # any NNX model; pj.metrics.* take model too
    pj.metrics.gradient_alignment(model, batch)

The models of ``pfa_jax.nnx.models`` have hand-written linen twins (``model.linen``); any other
NNX model gets ``Twin``: a linen module whose ``apply`` merges the model's graph with the arrays it
is given and calls it. Its variables are the model's own, by type: ``params`` (``nnx.Param``),
``feedback`` (``Feedback``), ``batch_stats`` (``nnx.BatchStat``), with the model's paths (list
indices as strings), so ``pfa_jax.metrics`` differentiates with respect to them as for a linen
model. The layer table comes from the model's rule layers (``pfa_jax.nnx.rule_layers``, those of
``pfa_jax.nnx.with_rule`` included, each with its kernel-matrix view). Inside ``apply``:

* every rule layer's output ``y`` (before its bias, which does not change ``dL/dy``) is ``y + p``
  with ``p`` its zero ``perturbations`` entry, which is how the metrics read ``dL/dy``;
* training mode: a model whose ``__call__`` takes ``train`` gets it; any other is called as
  ``nnx.view(model, deterministic=not train, use_running_average=not train)`` (Dropout and
  BatchNorm in the mode asked for), and its updated batch statistics come back in the updates;
* the RNG streams the metrics and train steps pass (``dropout``, ``feedback``) reseed the model's
  streams of those names, so the rule's pass and backprop's pass of one measurement draw the same
  Dropout masks and every train step new ones (a training-mode pass of a model with an
  ``nnx.Dropout`` asks for ``dropout``, which ``pfa_jax.train.create_train_state`` then finds);
* ``init`` gives the model's own arrays, whatever the key (the model was initialised when built),
  so ``create_train_state`` trains it as a linen model (``pfa-jax train`` with an NNX factory);
  the model's other variables (other RNG streams, own ``nnx.Variable`` types) are read as they
  were when the twin was made (one twin per model and graph, kept while the model lives).
"""
from __future__ import annotations

import inspect
import weakref

import flax.linen as nn
import jax
from flax import nnx

from pfa_jax.nnx.layers import Feedback, measured, rule_layers

__all__ = ["COLLECTIONS", "Twin", "twin", "variables"]

COLLECTIONS = {"params": nnx.Param, "feedback": Feedback, "batch_stats": nnx.BatchStat}
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Snapshot:
    """The model's state when the twin was made, compared by identity (a static field)."""

    def __init__(self, states):
        self.states = states  # one State per collection of COLLECTIONS, then the rest


def _strings(tree):
    """A pure dict with every key a string (linen's collections; NNX list indices are ints)."""
    return {str(k): _strings(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


class Twin(nn.Module):
    """The NNX model of ``graphdef`` and ``snapshot`` as a linen module (module docstring)."""

    graphdef: nnx.GraphDef
    snapshot: _Snapshot
    takes_train: bool
    dropout: bool  # whether the model has an nnx.Dropout (a training-mode pass draws 'dropout')

    @nn.compact
    def __call__(self, x, train: bool = False):
        # fresh Variables in this trace, the given arrays in place of the snapshot's
        states = jax.tree.map(lambda a: a, self.snapshot.states)
        for state, collection in zip(states, COLLECTIONS):
            if self.variables.get(collection):
                nnx.replace_by_pure_dict(state, dict(self.variables[collection]))
        model = nnx.merge(self.graphdef, *states)
        if self.is_initializing():  # the model's own arrays, as they are
            for state, collection in zip(states, COLLECTIONS):
                for key, value in _strings(nnx.to_pure_dict(state)).items():
                    self.variable(collection, key, lambda v=value: v)
        elif train and self.dropout or self.has_rng("dropout"):
            key = self.make_rng("dropout")  # a Dropout without its own stream draws from 'default'
            nnx.reseed(model, dropout=key, default=key)
        if self.has_rng("feedback"):
            nnx.reseed(model, feedback=self.make_rng("feedback"))
        call = model if self.takes_train else nnx.view(  # a view: new modules, the same arrays
            model, deterministic=not train, use_running_average=not train,
            raise_if_not_found=False)
        with measured(self, {id(layer): path for path, layer in rule_layers(call)}):
            y = call(x, train=train) if self.takes_train else call(x)
        if self.is_mutable_collection("batch_stats") and self.variables.get("batch_stats"):
            for key, value in _strings(nnx.to_pure_dict(nnx.state(call, nnx.BatchStat))).items():
                self.put_variable("batch_stats", key, value)
        return y


def twin(model: nnx.Module) -> Twin:
    """The model's ``Twin`` (one per model and graph)."""
    graphdef, *states = nnx.split(model, *COLLECTIONS.values(), nnx.Intermediate, ...)
    cached = _TWINS.get(model)
    if cached is not None and cached.graphdef == graphdef:
        return cached
    takes_train = "train" in inspect.signature(type(model).__call__).parameters
    kept = states[:len(COLLECTIONS)] + states[len(COLLECTIONS) + 1:]  # intermediates dropped
    dropout = any(isinstance(m, nnx.Dropout) for _, m in nnx.iter_modules(model))
    made = Twin(graphdef, _Snapshot(kept), takes_train, dropout)
    _TWINS[model] = made
    return made


def variables(model: nnx.Module) -> dict:
    """The model's arrays as the twin's variables (string keys)."""
    return {collection: _strings(nnx.to_pure_dict(nnx.state(model, kind)))
            for collection, kind in COLLECTIONS.items()}
