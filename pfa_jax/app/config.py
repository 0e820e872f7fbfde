"""Run configuration as an ``ml_collections.ConfigDict`` in sections (the big_vision habit), with
command-line overrides, and old run directories' configs migrated.

    config = default_config()                 # every key, with the defaults below
    override(config, ["optimizer.learning_rate=0.05", "rule.options.expansion=5"])
    spec = pfa_jax.app.spec.resolve(config)   # validated once, into a typed, frozen run spec

Keys:

* ``model`` / ``model_options``: a name of ``pfa_jax.models.names()``, or an own model's factory
  ``'package.module:callable'`` (``pfa_jax.app.own_model``), and its options.
* ``rule``: ``rule.name`` (one of ``pfa_jax.rules.names()``), ``rule.options`` (its options) and
  ``rule.layers`` (layer paths mapped to rule names that override it, e.g. ``{'output': 'bp'}``).
* ``dataset``, ``data_dir``, ``holdout``, ``pad_to``, ``limit``: see ``pfa_jax.app.data.load``; the
  text corpora of ``pfa_jax.app.text`` (``fortunes``, ``tiny_shakespeare``) are trained with the
  next-token loss (``pfa_jax.losses.next_token``) and take ``data_dir``, ``limit`` and ``context``.
* ``image_size``: the crop size of streamed datasets (``pfa_jax.app.streaming``; 0: 224); in-memory
  datasets keep their size and take only 0.
* ``context``: the tokens per window of a text corpus (``pfa_jax.app.text``; 0: 128); image
  datasets take only 0.
* ``data_processes``: grain worker processes preparing the batches of streamed datasets (0: in
  threads of the training process); in-memory datasets take only 0.
* ``augment``: a training-time augmentation of ``pfa_jax.augment.AUGMENTATIONS`` (``crop_flip``:
  the CIFAR pad-4 crop and horizontal flip).
* ``noise_pretrain_steps``: train steps on Gaussian noise with random labels before the data
  (``pfa_jax.app.pretrain``; 0: none), at ``batch_size``.
* ``epochs``, ``batch_size``, ``eval_batch_size``, ``seed``.
* ``devices``: how many devices train (data parallel, ``pfa_jax.app.placement``): 0, the default,
  every device of every process; ``n`` the first ``n`` (1: one device). The batch sizes must
  divide by the count; the numbers are those of one device to float rounding.
* ``log_every_steps``: the per-step scalars of the run's TensorBoard events
  (``pfa_jax.app.events``) every that many steps (0: none).
* ``checkpoint_every_steps``: streamed datasets also checkpoint every that many steps within an
  epoch, and ``--resume`` continues from the newest of those mid-epoch (0: at epoch ends only; an
  in-memory epoch is one compiled call, so in-memory datasets take only 0).
* ``optimizer``: the fields of ``pfa_jax.optim.OptimizerConfig`` (``steps_per_epoch`` is derived;
  ``optimizer.feedback``: overrides for the optimizer of plastic feedback, e.g. ``{'weight_decay': 0.0}``).
* Metrics (``pfa_jax.metrics``; see ``pfa_jax.app.experiment``): every epoch, gradient alignment on the
  first ``metrics_batch_size`` test examples (0: off). At the end, when asked:
  ``sharpness.enabled`` on the first ``sharpness.examples`` training examples with
  ``sharpness.iterations``, ``sharpness.tolerance`` and ``sharpness.probes``;
  ``robustness.adversarial_epsilons`` (L-inf radii in pixel units, images in [0, 1]) for each attack
  of ``robustness.attacks`` (PGD with ``robustness.pgd_steps``); ``robustness.noise_sigmas``
  (Gaussian noise std in pixel units); both on the first ``robustness.examples`` test examples.

A ``config.json`` written before the sections existed (flat keys ``rule``, ``rule_options``,
``layer_rules``, ``sharpness``, ``sharpness_*``, ``adversarial_*``, ``pgd_steps``, ``noise_sigmas``,
``robustness_examples``) is migrated by ``from_json`` (``MIGRATED`` maps each old key to its new
place); so is an old key given to ``--set``, with an error naming the new key. JSON turns tuples
into lists; ``from_json`` and ``set_value`` turn them back, the only places that do.

Every value is checked when it is set (``set_value``, which ``override`` and ``from_json`` use)
against the type of its key's default: ints, numbers (``SCHEDULED`` keys also a tuple of numbers,
one per schedule segment), strings, booleans, the tuples of ``TUPLES``, dicts for sections. A
``--set`` text that is not a Python literal is taken as a string, which only string keys accept
(the error says so); ``inf`` and ``nan`` are read as floats (and then refused by the checks of
``pfa_jax.app.spec``). The free sections ``FREE`` take any keys; their values are checked by the
model, the rule and the optimizer they configure.
"""
from __future__ import annotations

import ast
import functools
import json
from collections.abc import Iterable

import ml_collections

__all__ = ["default_config", "FREE", "from_json", "get", "MIGRATED", "override", "SCHEDULED", "set_value",
           "tuples", "TUPLES"]

# sections whose keys are free (options of the model, the rule, the feedback optimizer; per-layer rules)
FREE = ("model_options", "rule.options", "rule.layers", "optimizer.feedback")
# number-valued keys that also take one value per schedule segment
SCHEDULED = ("optimizer.learning_rate", "optimizer.weight_decay")
# tuple-valued keys: (element types, their description)
TUPLES = {"optimizer.lr_milestones": ((int,), "ints (epochs)"),
          "optimizer.wd_milestones": ((int,), "ints (epochs)"),
          "robustness.adversarial_epsilons": ((int, float), "numbers"),
          "robustness.noise_sigmas": ((int, float), "numbers"),
          "robustness.attacks": ((str,), "strings")}

# old flat key -> (section, key) of the sectioned config
MIGRATED = {
    "rule": ("rule", "name"), "rule_options": ("rule", "options"), "layer_rules": ("rule", "layers"),
    "sharpness": ("sharpness", "enabled"), "sharpness_examples": ("sharpness", "examples"),
    "sharpness_iterations": ("sharpness", "iterations"),
    "sharpness_tolerance": ("sharpness", "tolerance"), "sharpness_probes": ("sharpness", "probes"),
    "adversarial_epsilons": ("robustness", "adversarial_epsilons"),
    "adversarial_attacks": ("robustness", "attacks"), "pgd_steps": ("robustness", "pgd_steps"),
    "noise_sigmas": ("robustness", "noise_sigmas"),
    "robustness_examples": ("robustness", "examples"),
}


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default. Not type-locked: a schedule value may replace a scalar, e.g.
    ``optimizer.weight_decay=(0.03, 9e-5)``; the values are validated by ``pfa_jax.app.spec``."""
    return ml_collections.ConfigDict(type_safe=False, initial_dictionary={
        "model": "ffn2",
        "model_options": {},
        "rule": {"name": "bp", "options": {}, "layers": {}},
        "dataset": "fashion_mnist",
        "data_dir": "",
        "holdout": 0,
        "pad_to": 0,
        "limit": 0,
        "image_size": 0,
        "context": 0,
        "data_processes": 0,
        "augment": "none",
        "noise_pretrain_steps": 0,
        "epochs": 3,
        "batch_size": 64,
        "eval_batch_size": 1000,
        "seed": 0,
        "devices": 0,
        "optimizer": {
            "name": "sgd",
            "learning_rate": 0.01,
            "lr_milestones": (),
            "lr_decay": 0.1,
            "weight_decay": 1e-4,
            "wd_milestones": (),
            "momentum": 0.9,
            "nesterov": False,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "feedback": {},
        },
        "metrics_batch_size": 256,
        "log_every_steps": 50,
        "checkpoint_every_steps": 0,
        "sharpness": {"enabled": False, "examples": 1000, "iterations": 100, "tolerance": 1e-3,
                      "probes": 100},
        "robustness": {"adversarial_epsilons": (), "attacks": ("fgsm", "pgd"), "pgd_steps": 10,
                       "noise_sigmas": (), "examples": 1000},
    })


def get(config: ml_collections.ConfigDict, key: str):
    """The value of the dotted ``key`` (e.g. ``'rule.name'``)."""
    return functools.reduce(lambda node, part: node[part], key.split("."), config)


def tuples(value):
    """``value`` with every list (at any depth of dicts and lists) a tuple."""
    if isinstance(value, (list, tuple)):
        return tuple(tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: tuples(v) for k, v in value.items()}
    return value


def from_json(text: str) -> ml_collections.ConfigDict:
    """A config from its JSON text (a run directory's ``config.json``): the flat keys of an old
    config migrated into their sections (``MIGRATED``), keys added since then at their defaults,
    lists turned back into tuples, every value checked as by ``set_value``. Invalid JSON, a key no
    config has ever had or a value of the wrong type raises ``ValueError``."""
    try:
        flat = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {error.msg} at line {error.lineno} column "
                         f"{error.colno}") from None
    if not isinstance(flat, dict):
        raise ValueError(f"not a config: the JSON holds a {type(flat).__name__}, not an object")
    old = {k: flat.pop(k) for k in list(flat)
           if k in MIGRATED and (MIGRATED[k][0] != k or not isinstance(flat[k], dict))}
    for key, value in old.items():
        section, name = MIGRATED[key]
        flat.setdefault(section, {})[name] = value
    config = default_config()
    for key, value in flat.items():
        set_value(config, key, value)
    return config


def _renamed(key: str, config: ml_collections.ConfigDict, value) -> str | None:
    """The new name of an old flat ``key`` (``MIGRATED``), or None if ``key`` is not one (a key
    that is both, as ``rule``, is the new section when given a dict)."""
    top, *rest = key.split(".")
    if top not in MIGRATED or (top in config and (rest or isinstance(value, dict))):
        return None
    return ".".join(MIGRATED[top] + tuple(rest))


def _kind(key: str, default) -> tuple[tuple[type, ...], str]:
    """The types a value of ``key`` may have, from its default (and ``SCHEDULED`` / ``TUPLES``),
    and their description for an error message."""
    if key in TUPLES:
        return (tuple,), f"a tuple of {TUPLES[key][1]}"
    if isinstance(default, bool):
        return (bool,), "True or False"
    if isinstance(default, int):
        return (int,), "an int"
    if isinstance(default, float):
        return ((int, float, tuple), "a number or a tuple of numbers (one per schedule segment)"
                ) if key in SCHEDULED else ((int, float), "a number")
    return (str,), "a string"


@functools.cache
def _default(key: str):
    """The default value of the dotted leaf ``key`` (a number, string or tuple: immutable)."""
    return get(default_config(), key)


def _typed(key: str, value):
    """``value`` if it has the type of ``key``'s default (a string that spells a float, e.g.
    ``'inf'``, as that float); else ``ValueError`` naming the key, the value and the type."""
    default = _default(key)
    types, description = _kind(key, default)
    if isinstance(value, str) and float in types:
        try:
            value = float(value)
        except ValueError:
            pass
    elements = TUPLES[key][0] if key in TUPLES else (int, float)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types) and (
        not isinstance(value, tuple) or all(
            isinstance(v, elements) and not isinstance(v, bool) for v in value))
    if not ok:
        raise ValueError(f"config {key}={value!r} must be {description} (default {default!r})")
    return value


def set_value(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets the dotted ``key`` (e.g. ``'optimizer.learning_rate'``) to ``value``, checked against the
    type of the key's default (``ValueError`` naming the key, the value and what it must be).

    A section (``optimizer``, ``sharpness``, ...) takes a dict, whose keys are set one by one; the
    free-form sections ``FREE`` (the model's and the rule's options, the per-layer rules) take any
    keys, whose values are checked where they are used (``pfa_jax.app.spec``).
    """
    renamed = _renamed(key, config, value)
    if renamed is not None:
        raise ValueError(f"config key {key!r} is now {renamed!r}: set {renamed}=...")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        where = ".".join(parents[:i + 1])
        if ".".join(parents[:i]) in FREE and parents[:i]:
            raise ValueError(f"config key {key!r}: {'.'.join(parents[:i])} takes plain options, "
                             f"not sections")
        if part not in node:
            raise ValueError(f"unknown config key {where!r}; valid keys: {sorted(node.keys())}")
        if not isinstance(node[part], ml_collections.ConfigDict):
            raise ValueError(f"config key {where!r} holds a value ({node[part]!r}), not a "
                             f"section: set {where}=VALUE")
        node = node[part]
    value = tuples(value)
    if ".".join(parents) in FREE:
        node[leaf] = value
        return
    if leaf not in node:
        section = f" of {'.'.join(parents)}" if parents else ""
        raise ValueError(f"unknown config key {key!r}; valid keys{section}: {sorted(node.keys())}")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        if not isinstance(value, dict):
            raise ValueError(f"config {key}={value!r} must be a dict (a section: "
                             f"{sorted(node[leaf].keys())})")
        if key in FREE:
            node[leaf] = value
            return
        for inner, inner_value in value.items():
            set_value(config, f"{key}.{inner}", inner_value)
        return
    node[leaf] = _typed(key, value)


def override(config: ml_collections.ConfigDict, assignments: Iterable[str]
             ) -> ml_collections.ConfigDict:
    """Applies ``key.sub=value`` assignments; values are Python literals (else strings)."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"override {assignment!r} is not of the form key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as error:
            value, unparsed = text, f" ({error.msg})" if isinstance(error, SyntaxError) else ""
        else:
            unparsed = None
        try:
            set_value(config, key, value)
        except ValueError as error:
            if unparsed is None:
                raise
            raise ValueError(f"{error}; {text!r} is not a Python literal{unparsed}, so it was "
                             "read as a string") from None
    return config
