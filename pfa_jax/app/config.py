"""Run configuration as an ``ml_collections.ConfigDict`` in sections (the big_vision habit), with
command-line overrides, and old run directories' configs migrated.

    config = default_config()                 # every key, with the defaults below
    override(config, ["optimizer.learning_rate=0.05", "rule.options.expansion=5"])
    spec = pfa_jax.app.spec.resolve(config)   # validated once, into a typed, frozen run spec

Keys:

* ``model`` / ``model_options``: a name of ``pfa_jax.models.names()`` and its options.
* ``rule``: ``rule.name`` (one of ``pfa_jax.rules.names()``), ``rule.options`` (its options) and
  ``rule.layers`` (layer paths mapped to rule names that override it, e.g. ``{'output': 'bp'}``).
* ``dataset``, ``data_dir``, ``holdout``, ``pad_to``, ``limit``: see ``pfa_jax.app.data.load``.
* ``image_size``: the crop size of streamed datasets (``pfa_jax.app.streaming``; 0: 224); in-memory
  datasets keep their size and take only 0.
* ``augment``: a training-time augmentation of ``pfa_jax.augment.AUGMENTATIONS`` (``crop_flip``:
  the CIFAR pad-4 crop and horizontal flip).
* ``noise_pretrain_steps``: train steps on Gaussian noise with random labels before the data
  (``pfa_jax.app.pretrain``; 0: none), at ``batch_size``.
* ``epochs``, ``batch_size``, ``eval_batch_size``, ``seed``.
* ``optimizer``: the fields of ``pfa_jax.optim.OptimizerConfig`` (``steps_per_epoch`` is derived).
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
"""
from __future__ import annotations

import ast
import json
from typing import Iterable

import ml_collections

__all__ = ["default_config", "from_json", "MIGRATED", "override", "set_value", "tuples"]

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
        "augment": "none",
        "noise_pretrain_steps": 0,
        "epochs": 3,
        "batch_size": 64,
        "eval_batch_size": 1000,
        "seed": 0,
        "optimizer": {
            "name": "sgd",
            "learning_rate": 0.01,
            "lr_milestones": (),
            "lr_decay": 0.1,
            "weight_decay": 1e-4,
            "wd_milestones": (),
            "momentum": 0.9,
        },
        "metrics_batch_size": 256,
        "sharpness": {"enabled": False, "examples": 1000, "iterations": 100, "tolerance": 1e-3,
                      "probes": 100},
        "robustness": {"adversarial_epsilons": (), "attacks": ("fgsm", "pgd"), "pgd_steps": 10,
                       "noise_sigmas": (), "examples": 1000},
    })


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
    lists turned back into tuples. A key no config has ever had raises ``ValueError``."""
    flat = json.loads(text)
    old = {k: flat.pop(k) for k in list(flat)
           if k in MIGRATED and (MIGRATED[k][0] != k or not isinstance(flat[k], dict))}
    for key, value in old.items():
        section, name = MIGRATED[key]
        flat.setdefault(section, {})[name] = value
    config = default_config()
    for section, value in flat.items():
        if isinstance(value, dict) and isinstance(config.get(section), ml_collections.ConfigDict) \
                and section not in ("model_options",):
            for key, inner in value.items():
                config[section][key] = tuples(inner)
        else:
            set_value(config, section, value)
    return config


def _renamed(key: str, config: ml_collections.ConfigDict) -> str | None:
    """The new name of an old flat ``key`` (``MIGRATED``), or None if ``key`` is not one."""
    top, *rest = key.split(".")
    if top not in MIGRATED or (top in config and rest):
        return None
    return ".".join(MIGRATED[top] + tuple(rest))


def set_value(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets the dotted ``key`` (e.g. ``'optimizer.learning_rate'``); a top-level key must exist."""
    renamed = _renamed(key, config)
    if renamed is not None:
        raise ValueError(f"config key {key!r} is now {renamed!r}: set {renamed}=...")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node:
            raise ValueError(f"unknown config key {'.'.join(parents[:i + 1])!r}; valid keys: "
                             f"{sorted(node.keys())}")
        node = node[part]
    if node is config and leaf not in config:
        raise ValueError(f"unknown config key {key!r}; valid keys: {sorted(config.keys())}")
    node[leaf] = tuples(value)


def override(config: ml_collections.ConfigDict, assignments: Iterable[str]
             ) -> ml_collections.ConfigDict:
    """Applies ``key.sub=value`` assignments; values are Python literals (else strings)."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"override {assignment!r} is not of the form key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        set_value(config, key, value)
    return config
