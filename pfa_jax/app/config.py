"""Run configuration as an ``ml_collections.ConfigDict``, with command-line overrides.

    config = default_config()                 # every key, with the defaults below
    override(config, ["optimizer.learning_rate=0.05", "rule_options.expansion=5"])

Keys:

* ``model`` / ``model_options``: a name of ``pfa_jax.models.names()`` and its options.
* ``rule`` / ``rule_options``: a name of ``pfa_jax.rules.names()`` and its options;
  ``layer_rules`` maps layer paths to rule names that override ``rule`` (e.g. ``{'output': 'bp'}``).
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
  ``sharpness`` (bool) on the first ``sharpness_examples`` training examples with
  ``sharpness_iterations``, ``sharpness_tolerance`` and ``sharpness_probes``;
  ``adversarial_epsilons`` (L-inf radii in pixel units, images in [0, 1]) for each attack of
  ``adversarial_attacks`` (PGD with ``pgd_steps``); ``noise_sigmas`` (Gaussian noise std in pixel
  units); both on the first ``robustness_examples`` test examples.
"""
from __future__ import annotations

import ast
from typing import Iterable

import ml_collections

from pfa_jax import augment, models, rules
from pfa_jax import nn as pnn
from pfa_jax.app import data
from pfa_jax.optim import OptimizerConfig

__all__ = ["default_config", "override", "rule_spec", "set_value", "validate"]


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default. Not type-locked: a schedule value may replace a scalar, e.g.
    ``optimizer.weight_decay=(0.03, 9e-5)``; the values are validated where they are used."""
    return ml_collections.ConfigDict(type_safe=False, initial_dictionary={
        "model": "ffn2",
        "model_options": {},
        "rule": "bp",
        "rule_options": {},
        "layer_rules": {},
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
        "sharpness": False,
        "sharpness_examples": 1000,
        "sharpness_iterations": 100,
        "sharpness_tolerance": 1e-3,
        "sharpness_probes": 100,
        "adversarial_epsilons": (),
        "adversarial_attacks": ("fgsm", "pgd"),
        "pgd_steps": 10,
        "noise_sigmas": (),
        "robustness_examples": 1000,
    })


def set_value(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets the dotted ``key`` (e.g. ``'optimizer.learning_rate'``); a top-level key must exist."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node:
            raise ValueError(f"unknown config key {'.'.join(parents[:i + 1])!r}; valid keys: "
                             f"{sorted(node.keys())}")
        node = node[part]
    if node is config and leaf not in config:
        raise ValueError(f"unknown config key {key!r}; valid keys: {sorted(config.keys())}")
    node[leaf] = tuple(value) if isinstance(value, list) else value


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


def rule_spec(config: ml_collections.ConfigDict):
    """The model's rule: one ``Rule``, or a per-layer mapping when ``layer_rules`` is set."""
    rule = rules.get(config.rule, **config.rule_options.to_dict())
    if not config.layer_rules:
        return rule
    return {pnn.DEFAULT: rule, **{k: rules.get(v) for k, v in config.layer_rules.items()}}


def _check_int(config, key: str, low: int = 1) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config {key}={value!r} must be an int >= {low}")


def _check_streamed(config: ml_collections.ConfigDict) -> None:
    """Options that streamed and in-memory datasets do not share."""
    if config.dataset in data.STREAMED_DATASETS:
        for key, plain in (("augment", "none"), ("holdout", 0), ("pad_to", 0)):
            if config[key] != plain:
                raise ValueError(f"config {key}={config[key]!r} is for in-memory datasets; "
                                 f"{config.dataset} is streamed (pfa_jax.app.streaming: random-resized "
                                 f"crop and flip, the validation split as test set): use {key}={plain!r}")
    elif config.image_size:
        raise ValueError(f"config image_size={config.image_size!r} applies to streamed datasets "
                         f"({', '.join(data.STREAMED_DATASETS)}) only; {config.dataset} images keep "
                         "their size (see pad_to): use image_size=0")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every key before any data is read or anything compiled; errors name the key, the bad
    value and what is valid. (Whether the model fits the dataset's images is checked once the data
    is loaded, by ``pfa_jax.app.experiment``.)"""
    for key, valid in (("model", models.names()), ("rule", rules.names()),
                       ("dataset", data.DATASETS)):
        if config[key] not in valid:
            raise ValueError(f"config {key}={config[key]!r} is unknown; valid: {', '.join(valid)}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        _check_int(config, key)
    _check_int(config, "noise_pretrain_steps", low=0)
    _check_int(config, "image_size", low=0)
    _check_streamed(config)
    try:
        augment.check(config.augment)
    except ValueError as error:
        raise ValueError(f"config {error}") from None
    try:
        rule_spec(config)
    except ValueError as error:
        raise ValueError(f"config rule_options={config.rule_options.to_dict()!r} / layer_rules="
                         f"{config.layer_rules.to_dict()!r}: {error}") from None
    try:
        models.get(config.model, **config.model_options.to_dict())
        optimizer = OptimizerConfig.create(config.optimizer)
    except ValueError as error:
        raise ValueError(f"config: {error}") from None
    for key in ("lr_milestones", "wd_milestones"):
        late = [m for m in getattr(optimizer, key) if m >= config.epochs]
        if late:
            raise ValueError(f"config optimizer.{key}={tuple(getattr(optimizer, key))!r} has "
                             f"milestone(s) {late} at or beyond epochs={config.epochs}: valid "
                             f"milestones lie in 1..{config.epochs - 1}")
