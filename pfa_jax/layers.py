"""A model's rule-following layers as a static table, and what is derived from it: which feedback
arrays are plastic, fixed or mirrored, the weight-mirror steps, and each layer's effective feedback.

    table = pfa_jax.layers.table(model, images)          # traced abstractly: no compute
    labels = pfa_jax.layers.feedback_labels(table, variables["feedback"])   # 'plastic' | 'fixed' | ...
    feedback = pfa_jax.layers.mirror(table, params, feedback, key)          # weight-mirror steps
    pairs = pfa_jax.layers.kernels_and_feedback(table, params, feedback)    # {name: (K, F)}

A ``Layer`` is a ``pfa_jax.nn.Dense`` / ``Conv`` of the model: its path (the module path joined by
``/``, the same as its key path in ``params`` and ``feedback``), its resolved rule, and the number of
leading axes that lifted transforms (``nn.scan``, ``nn.vmap``) add to its stored arrays: such a
layer is several layers, one per slice, and everything here treats each slice as its own layer,
named ``path[i]`` (``path[i,j]`` for two lifted axes). The table is found once by tracing the model
with ``jax.eval_shape`` while the layers record themselves (``pfa_jax.nn.recording``): ``table``
traces ``model.init``, ``pfa_jax.train.create_train_state`` its training-mode apply;
it is hashable, so it can be a static field of a jitted state. How an array learns is a property
of the layer's rule (``Rule.plastic``, ``Rule.mirrored``; every other feedback array is fixed), so
nothing about it is stored in the variables.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable

import jax
import numpy as np
from flax import traverse_util

from pfa_jax import nn as pnn
from pfa_jax import rules

__all__ = ["Layer"]

PLASTIC, FIXED, MIRRORED = "plastic", "fixed", "mirrored"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One rule-following layer: ``path``, resolved ``rule``, ``lifted`` leading axes."""

    path: str
    rule: rules.Rule
    lifted: int = 0
    view: Callable | None = None  # a kernel of any rank as the rule's matrix (pfa_jax.products)

    def matrix(self, kernel):
        """The kernel (of one slice) as the rule sees it: ``view(kernel)``, or itself."""
        return kernel if self.view is None else self.view(kernel)

    def slices(self, array) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, index)`` of every slice of ``array`` along the lifted axes (``[(path, ())]`` for
        a plain layer)."""
        if not self.lifted:
            return [(self.path, ())]
        return [(f"{self.path}[{','.join(map(str, index))}]", index)
                for index in np.ndindex(*np.shape(array)[:self.lifted])]


Table = tuple[Layer, ...]


def table(model, *args, rngs=None, **kwargs) -> Table:
    """The rule-following layers of ``model`` as ``model.init(rngs, *args, **kwargs)`` creates them
    (traced with ``jax.eval_shape``: shapes only, nothing computed). ``rngs`` defaults to keys for
    ``params`` and ``feedback``."""
    rngs = rngs or {"params": jax.random.key(0), "feedback": jax.random.key(0)}
    records = {}
    with pnn.recording(records):
        shapes = jax.eval_shape(lambda: model.init(rngs, *args, **kwargs))
    return from_records(records, shapes.get("params", {}))


def from_records(records: dict, params) -> Table:
    """The table of the layers that recorded themselves (``pfa_jax.nn.recording``) in a trace of a
    model whose ``params`` (arrays or shapes) are given."""
    params = traverse_util.flatten_dict(dict(params), sep="/")
    return tuple(Layer(path, rule, len(params[f"{path}/kernel"].shape) - rank, view)
                 for path, (rule, rank, view) in sorted(records.items()))


def _layer_groups(layers: Table, tree, what: str) -> dict[str, dict]:
    """``{layer path: its sub-dict of tree}``. ``params`` may hold arrays of other modules
    (BatchNorm); a ``feedback`` array of no layer in ``layers`` raises."""
    paths = {layer.path for layer in layers}
    groups: dict[str, dict] = {}
    for key, value in traverse_util.flatten_dict(dict(tree)).items():
        path = "/".join(key[:-1])
        if path not in paths:
            if what == "params":
                continue
            raise ValueError(f"{what} array {'/'.join(key)!r} belongs to no rule-following layer of "
                             f"the model; its layers are {sorted(paths)}")
        groups.setdefault(path, {})[key[-1]] = value
    return groups


def label(rule: rules.Rule, name: str) -> str:
    """How the feedback array ``name`` of a layer following ``rule`` learns: ``'plastic'``,
    ``'mirrored'`` or ``'fixed'``."""
    return PLASTIC if name in rule.plastic else MIRRORED if name in rule.mirrored else FIXED


def feedback_labels(layers: Table, feedback) -> dict:
    """A tree like ``feedback`` with each array labelled ``'plastic'`` (stepped by the optimizer:
    KP's ``B``, PFA's ``R``), ``'mirrored'`` (stepped by ``mirror``: weight-mirror ``B``) or
    ``'fixed'`` (never changed), e.g. for ``optax.multi_transform`` over a ``variables`` tree."""
    by_path = {layer.path: layer.rule for layer in layers}
    _layer_groups(layers, feedback, "feedback")

    def label_of(key_path, _):
        names = [k.key for k in key_path]
        return label(by_path["/".join(names[:-1])], names[-1])

    return jax.tree_util.tree_map_with_path(label_of, dict(feedback))


def select(tree, labels, keep: str) -> dict:
    """The arrays of a nested dict whose label is ``keep`` (empty dicts dropped)."""
    flat, flat_labels = traverse_util.flatten_dict(dict(tree)), traverse_util.flatten_dict(labels)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if flat_labels[k] == keep})


def merge(tree, part) -> dict:
    """``tree`` with the arrays of ``part`` (a subset of its paths) replaced."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(dict(tree)),
                                         **traverse_util.flatten_dict(dict(part))})


def _per_slice(fn, lifted: int):
    """``fn`` mapped over ``lifted`` leading axes of all its arguments."""
    for _ in range(lifted):
        fn = jax.vmap(fn)
    return fn


def layer_key(key, path: str):
    """The key of one layer: ``fold_in(key, crc32(path))``."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()))


def mirror(layers: Table, params, feedback, key, warmup: bool = False) -> dict:
    """``feedback`` after every weight-mirror layer's mirror steps (``warmup``: its initial mirroring
    phase), a pure function: layer ``path`` draws its noise from ``layer_key(key, path)`` (split into
    one key per slice of a lifted layer). Other feedback is returned as it is."""
    kernels = _layer_groups(layers, params, "params")
    groups = _layer_groups(layers, feedback, "feedback")
    mirrored = {}
    for layer in layers:
        if not layer.rule.mirrored:
            continue
        kernel = kernels[layer.path]["kernel"]
        shape, keys = kernel.shape[:layer.lifted], layer_key(key, layer.path)
        if layer.lifted:
            keys = jax.random.split(keys, math.prod(shape)).reshape(shape)
        step = _per_slice(lambda k, w, fb: layer.rule.mirror(k, layer.matrix(w), fb, warmup),
                          layer.lifted)
        mirrored[layer.path] = step(keys, kernel, groups[layer.path])
    return merge(feedback, traverse_util.unflatten_dict(
        {tuple(path.split("/")): value for path, value in mirrored.items()}))


def kernels_and_feedback(layers: Table, params, feedback) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{name: (K, F)}``: each layer's (each lifted slice's) kernel and effective feedback ``F``
    (``Rule.effective_feedback``, kernel layout); layers without a kernel-shaped ``F`` (DFA) are
    left out."""
    kernels = _layer_groups(layers, params, "params")
    groups = _layer_groups(layers, feedback, "feedback") if feedback else {}
    pairs = {}
    for layer in layers:
        kernel = _per_slice(layer.matrix, layer.lifted)(kernels[layer.path]["kernel"])
        effective = _per_slice(layer.rule.effective_feedback, layer.lifted)
        fb = groups.get(layer.path, {})
        if jax.eval_shape(effective, kernel, fb) is None:
            continue
        f = effective(kernel, fb)
        for name, index in layer.slices(kernel):
            pairs[name] = (kernel[index], f[index])
    return pairs
