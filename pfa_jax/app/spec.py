"""A run config resolved once into a typed, frozen run spec: the one place that validates a config and
calls ``rules.get``, ``models.get`` (or an own model's factory, ``pfa_jax.app.own_model``) and the
optimizer builder.

    spec = resolve(config)        # every key checked, before any data is read or anything compiled
    spec.rule, spec.model, spec.optimizer, spec.data, spec.sharpness, spec.robustness

Errors name the key, the bad value and what is valid. What needs the data (whether the model fits
the images, the steps per epoch that turn milestones into steps) is checked by
``pfa_jax.app.experiment`` once the data is loaded, before training. The optimizer is kept as the
validated ``OptimizerConfig``; ``experiment.train_and_evaluate`` builds its transformation once,
with the steps per epoch.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import flax.linen as nn
import ml_collections

from pfa_jax import augment, losses, metrics, models, optim, rules
from pfa_jax import nn as pnn
from pfa_jax.app import config as config_lib
from pfa_jax.app import data, own_model, streaming, text
from pfa_jax.optim import OptimizerConfig
from pfa_jax.rules import forms
from pfa_jax.rules.direct_feedback import DFA
from pfa_jax.rules.product_feedback import PFA

__all__ = ["DataSpec", "DATASETS", "num_classes", "resolve", "Robustness", "RunSpec", "Sharpness"]


DATASETS = data.DATASETS + text.CORPORA  # images in memory, streamed images, text corpora
TEXT_CONTEXT = 128  # tokens per window of a text corpus when ``context`` is 0


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the training data comes from and how it is batched (``pfa_jax.app.sources``)."""

    dataset: str
    data_dir: str | None
    holdout: int
    pad_to: int | None
    limit: int | None
    image_size: int
    processes: int
    augment: str
    batch_size: int
    eval_batch_size: int
    seed: int
    context: int = 0  # tokens per window of a text corpus (``pfa_jax.app.text``)

    @property
    def streamed(self) -> bool:
        return self.dataset in streaming.DATASETS

    @property
    def text(self) -> bool:
        return self.dataset in text.CORPORA


@dataclasses.dataclass(frozen=True)
class Sharpness:
    """The closing sharpness measurement (``pfa_jax.metrics.sharpness``)."""

    examples: int
    iterations: int
    tolerance: float
    probes: int


@dataclasses.dataclass(frozen=True)
class Robustness:
    """The closing robustness measurements (``metrics.adversarial``, ``metrics.corruption``)."""

    examples: int
    adversarial_epsilons: tuple[float, ...]
    attacks: tuple[str, ...]
    pgd_steps: int
    noise_sigmas: tuple[float, ...]

    @property
    def enabled(self) -> bool:
        return bool(self.adversarial_epsilons or self.noise_sigmas)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A validated run: ``config`` (written to ``config.json``) and what it resolves to."""

    config: ml_collections.ConfigDict
    rule: Any  # a Rule, or a per-layer mapping {'default': Rule, path: Rule}
    model: nn.Module
    loss: losses.Loss  # next_token for text corpora, else classification
    optimizer: OptimizerConfig
    data: DataSpec
    epochs: int
    seed: int
    devices: int
    noise_pretrain_steps: int
    metrics_batch_size: int
    log_every_steps: int
    checkpoint_every_steps: int
    sharpness: Sharpness | None
    robustness: Robustness

    @property
    def title(self) -> str:
        return f"{self.data.dataset} {self.config.model} {self.config.rule.name} seed {self.seed}"


def num_classes(dataset: str) -> int:
    """The number of classes of ``dataset`` (of a text corpus: its vocabulary size)."""
    if dataset in text.CORPORA:
        return len(text.VOCABULARY)
    return streaming.NUM_CLASSES if dataset in streaming.DATASETS else data.NUM_CLASSES


def _int(config, key: str, low: int = 1) -> int:
    value = config_lib.get(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config {key}={value!r} must be an int >= {low}")
    return value


def _choice(config, key: str, valid) -> str:
    value = config_lib.get(config, key)
    if value not in valid:
        raise ValueError(f"config {key}={value!r} is unknown; valid: {', '.join(valid)}")
    return value


def _plain(config, dataset: str, keys) -> None:
    """Refuses every ``(key, plain value, why)`` of ``keys`` whose value is not the plain one."""
    for key, plain, why in keys:
        if config[key] != plain:
            raise ValueError(f"config {key}={config[key]!r} does not apply to {dataset}: {why}; "
                             f"use {key}={plain!r}")


def _data(config) -> DataSpec:
    dataset = _choice(config, "dataset", DATASETS)
    context = _int(config, "context", low=0)
    if dataset in text.CORPORA:
        windows = "a text corpus is read as fixed windows of characters (pfa_jax.app.text)"
        _plain(config, dataset, [(key, plain, windows) for key, plain in (
            ("augment", "none"), ("holdout", 0), ("pad_to", 0), ("image_size", 0),
            ("data_processes", 0), ("checkpoint_every_steps", 0), ("noise_pretrain_steps", 0))])
        context = config.context = context or TEXT_CONTEXT  # config.json records the windows
    elif context:
        raise ValueError(f"config context={context!r} applies to text corpora "
                         f"({', '.join(text.CORPORA)}) only; {dataset} holds images: use context=0")
    if dataset in data.STREAMED_DATASETS:
        for key, plain in (("augment", "none"), ("holdout", 0), ("pad_to", 0)):
            if config[key] != plain:
                raise ValueError(f"config {key}={config[key]!r} is for in-memory datasets; "
                                 f"{dataset} is streamed (pfa_jax.app.streaming: random-resized "
                                 f"crop and flip, the validation split as test set): use "
                                 f"{key}={plain!r}")
    else:
        for key, why in (("image_size", "images keep their size (see pad_to)"),
                         ("data_processes", "batches are gathered on the device"),
                         ("checkpoint_every_steps", "epochs are one compiled call each")):
            if config[key]:
                raise ValueError(f"config {key}={config[key]!r} applies to streamed datasets "
                                 f"({', '.join(data.STREAMED_DATASETS)}) only; {dataset}'s {why}: "
                                 f"use {key}=0")
    try:
        augment.check(config.augment)
    except ValueError as error:
        raise ValueError(f"config {error}") from None
    return DataSpec(dataset=dataset, data_dir=config.data_dir or None,
                    holdout=_int(config, "holdout", low=0),
                    pad_to=_int(config, "pad_to", low=0) or None,
                    limit=_int(config, "limit", low=0) or None,
                    image_size=_int(config, "image_size", low=0),
                    processes=_int(config, "data_processes", low=0), augment=config.augment,
                    batch_size=_int(config, "batch_size"),
                    eval_batch_size=_int(config, "eval_batch_size"),
                    seed=_int(config, "seed", low=0), context=context)


def _rule(config):
    """One ``Rule``, or a per-layer mapping when ``rule.layers`` is set."""
    section = config.rule
    _choice(config, "rule.name", rules.names())
    try:
        rule = rules.get(section.name, **section.options.to_dict())
    except ValueError as error:
        raise ValueError(f"config rule.options: {error}") from None
    if not section.layers:
        return rule
    try:
        return {pnn.DEFAULT: rule, **{k: rules.get(v) for k, v in section.layers.items()}}
    except ValueError as error:
        raise ValueError(f"config rule.layers={section.layers.to_dict()!r}: {error}") from None


def _optimizer(config, epochs: int) -> OptimizerConfig:
    try:
        optimizer = OptimizerConfig.create(config.optimizer)
    except ValueError as error:
        raise ValueError(f"config: {error}") from None
    for prefix, stepped in (("optimizer", optimizer), ("optimizer.feedback", optimizer.feedback)):
        for key in ("lr_milestones", "wd_milestones") if stepped else ():
            late = [m for m in getattr(stepped, key) if m >= epochs]
            if late:
                raise ValueError(f"config {prefix}.{key}={tuple(getattr(stepped, key))!r} has "
                                 f"milestone(s) {late} at or beyond epochs={epochs}: valid "
                                 f"milestones lie in 1..{epochs - 1}")
    return optimizer


def _check_feedback_optimizer(rule, optimizer: OptimizerConfig, config) -> None:
    """Refuses ``optimizer.feedback`` when no layer's rule has plastic feedback to step."""
    used = list(rule.values()) if isinstance(rule, dict) else [rule]
    if optimizer.feedback is not None and not any(r.plastic for r in used):
        plastic = [n for n in rules.names() if rules.get(n).plastic]
        raise ValueError(f"config optimizer.feedback={config.optimizer.feedback.to_dict()!r} "
                         f"configures the optimizer of plastic feedback, which rule "
                         f"{config.rule.name!r} does not have (rules with plastic feedback: "
                         f"{', '.join(plastic)}): use optimizer.feedback={{}}")


def _measurements(config) -> tuple[Sharpness | None, Robustness]:
    """The closing measurements, every value checked now rather than after training."""
    sharp, robust = config.sharpness, config.robustness
    for attack in robust.attacks:
        metrics.check_attack(attack, "true", *robust.adversarial_epsilons)
    if any(not 0 <= s < math.inf for s in robust.noise_sigmas):
        raise ValueError(f"config robustness.noise_sigmas={tuple(robust.noise_sigmas)!r} must be "
                         "finite and >= 0")
    _int(config, "metrics_batch_size", low=0)
    for key in ("robustness.examples", "robustness.pgd_steps"):
        _int(config, key, low=1 if robust.adversarial_epsilons or robust.noise_sigmas else 0)
    if sharp.enabled:
        for key, low in (("sharpness.examples", 1), ("sharpness.iterations", 1),
                         ("sharpness.probes", 2)):
            _int(config, key, low=low)
        if not 0 <= sharp.tolerance < math.inf:
            raise ValueError(f"config sharpness.tolerance={sharp.tolerance!r} must be finite and "
                             ">= 0")
    robustness = Robustness(robust.examples, tuple(robust.adversarial_epsilons),
                            tuple(robust.attacks), robust.pgd_steps, tuple(robust.noise_sigmas))
    sharpness = (Sharpness(sharp.examples, sharp.iterations, sharp.tolerance, sharp.probes)
                 if sharp.enabled else None)
    return sharpness, robustness


def _stored_forms(rule, optimizer: OptimizerConfig, config):
    """PFA's storage form for this run's optimizer, decided by the library
    (``pfa_jax.rules.for_optimizer``, given the transformation that steps the feedback): ``"auto"``
    becomes ``"G"`` (``"F"`` where ``C`` is ill-conditioned) where the forms are equivalent, else
    ``"R"``. An explicit ``"F"`` or ``"G"`` under another optimizer, which the library keeps with
    a warning, is refused here. The default rule's decided form is written into
    ``config.rule.options.form``."""
    tx, feedback = optim.build(optimizer)
    explicit = [r.form for r in map(rules.get, forms.entries(rule))
                if isinstance(r, PFA) and r.stored != "R"]
    if explicit and not forms.commutes(feedback or tx):
        raise ValueError(f"config rule.options.form={explicit[0]!r} needs an optimizer linear in "
                         "the gradient for the feedback (sgd); optimizer "
                         f"{(optimizer.feedback or optimizer).name!r} is not, so the forms would "
                         "differ: use form='R' or 'auto'")
    resolved = forms.for_optimizer(rule, feedback or tx)
    default = resolved[pnn.DEFAULT] if isinstance(resolved, dict) else resolved
    if isinstance(default, PFA):
        config.rule.options.form = default.form
    return resolved


def resolve(config: ml_collections.ConfigDict) -> RunSpec:
    """``config`` validated and resolved (module docstring); ``spec.config`` is a copy of
    ``config`` with PFA's resolved storage form set (``rule.options.form``)."""
    config = copy.deepcopy(config)
    if not own_model.is_factory(config.model):
        _choice(config, "model", models.names())
    epochs = _int(config, "epochs")
    data_spec = _data(config)
    optimizer = _optimizer(config, epochs)
    rule = _stored_forms(_rule(config), optimizer, config)
    _check_feedback_optimizer(rule, optimizer, config)
    if isinstance(rule, DFA):
        config.rule.options.grid = rule.grid  # config.json records the projection trained with
    classes, options = num_classes(data_spec.dataset), config.model_options.to_dict()
    if own_model.is_factory(config.model):
        model = own_model.build(config.model, rule, classes, options, data_spec.seed)
    else:
        try:
            model = models.get(config.model, rule=rule, num_classes=classes, **options)
        except ValueError as error:
            raise ValueError(f"config: {error}") from None
    sharpness, robustness = _measurements(config)
    if data_spec.text and robustness.enabled:
        raise ValueError(f"config robustness: adversarial and noise robustness perturb images in "
                         f"pixel units; {data_spec.dataset} holds tokens: use "
                         "robustness.adversarial_epsilons=() and robustness.noise_sigmas=()")
    return RunSpec(config=config, rule=rule, model=model,
                   loss=losses.next_token if data_spec.text else losses.classification,
                   optimizer=optimizer,
                   data=data_spec, epochs=epochs, seed=data_spec.seed,
                   devices=_int(config, "devices", low=0),
                   noise_pretrain_steps=_int(config, "noise_pretrain_steps", low=0),
                   metrics_batch_size=config.metrics_batch_size,
                   log_every_steps=_int(config, "log_every_steps", low=0),
                   checkpoint_every_steps=_int(config, "checkpoint_every_steps", low=0),
                   sharpness=sharpness,
                   robustness=robustness)
