"""Own models in the command and the runner: ``model = 'package.module:factory'``.

    pfa-jax train --rule pfa --set model=mylab.nets:tiny_vit --set model_options.depth=2

A config's ``model`` is a name of ``pfa_jax.models.names()`` or ``'package.module:attribute'``,
an importable callable returning a ``flax.linen`` (or ``flax.nnx``, below) module. It is called
with ``model_options`` as
keyword arguments and, where its signature has them, ``num_classes=`` (the dataset's) and ``rule=``
(the run's rule spec, per-layer maps included, with DFA's ``classes`` bound):

* a factory taking ``rule`` builds its network from ``pfa_jax.nn`` layers and is used as returned;
* a factory without ``rule`` returns an unchanged Flax model, which the command puts under the rule
  with ``pfa_jax.nn.with_rule`` (its ``nn.Dense`` / ``DenseGeneral`` / ``Einsum`` / ``Conv`` /
  attention projections / RNN cells follow the rule of their path; a kernel the mechanism cannot
  reach is an error naming it).

An NNX factory (returning an ``nnx.Module``) also gets ``rngs=nnx.Rngs(seed)`` where it takes
``rngs`` (the run's seed), goes under the rule with ``pfa_jax.nnx.with_rule`` when it takes no
``rule``, and is trained as its linen twin (``pfa_jax.nnx.twin``): the same arrays, paths and
rule, its Dropout drawing from the run's ``dropout`` stream; checkpoints hold its arrays.

``config.json`` records the string, so ``--resume`` and ``experiments.run`` rebuild the same model;
where the module cannot be imported (not installed, not on ``PYTHONPATH``) or has no such
attribute, the run stops before touching the run directory with an error naming both.
"""
from __future__ import annotations

import importlib
import inspect

import flax.linen as nn
from flax import nnx

from pfa_jax import nn as pnn
from pfa_jax import nnx as pnnx
from pfa_jax.nnx import twin

__all__ = ["build", "is_factory"]


def is_factory(name: str) -> bool:
    """Whether a config's ``model`` names an own factory (``'package.module:attribute'``)."""
    return ":" in name


def _factory(name: str):
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"config model={name!r}: cannot import {module_name!r} ({error}); the "
                         "module must be importable (installed, or on PYTHONPATH) wherever the "
                         "run is started or resumed") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"config model={name!r}: {module_name!r} has no callable {attribute!r} "
                         f"(its public names: {[n for n in dir(module) if not n.startswith('_')]})")
    return factory


def build(name: str, rule: pnn.RuleSpec, num_classes: int, options: dict, seed: int = 0):
    """The model of the factory ``name`` (module docstring) under ``rule``; an NNX factory gets
    ``rngs=nnx.Rngs(seed)`` where it takes ``rngs``, and its model is trained as its linen twin."""
    factory = _factory(name)
    parameters = inspect.signature(factory).parameters
    kwargs = dict(options)
    for key, value in (("num_classes", num_classes), ("rngs", nnx.Rngs(seed)),
                       ("rule", pnn.bind_classes(rule, num_classes))):
        if key in parameters:
            kwargs[key] = value
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise ValueError(f"config model={name!r} with model_options={options!r}: {error}") from None
    if isinstance(model, nnx.Module):
        if "rule" not in parameters:
            model = pnnx.with_rule(model, rule, rngs=nnx.Rngs(seed + 1), num_classes=num_classes)
        return twin.twin(model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"config model={name!r} returned {type(model).__name__}, not a "
                         "flax.linen or flax.nnx Module")
    return model if "rule" in parameters else pnn.with_rule(model, rule)
