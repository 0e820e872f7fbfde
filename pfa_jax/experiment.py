"""One training run from a config: data -> model(rule) -> state -> compiled epochs -> files.

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON record per
epoch: train / test loss and accuracy, learning rate, weight decay, per-layer alignment, epoch time)
and ``summary.json`` (the final record and the wall time).
"""
from __future__ import annotations

import json
import math
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from pfa_jax import data, metrics, models, train
from pfa_jax.config import rule_spec
from pfa_jax.optim import OptimizerConfig


class DivergenceError(RuntimeError):
    """The training loss became non-finite."""


def prepare_run_dir(out: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run directory {out} already exists; pass --overwrite to replace "
                                  "it or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _floats(tree):
    return jax.tree.map(lambda x: float(x), jax.device_get(tree))


def run(config: ml_collections.ConfigDict, out: str | pathlib.Path, overwrite: bool = False,
        progress: bool = True) -> dict:
    """Trains ``config`` and writes the run directory ``out``; returns the summary."""
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(f"epochs={config.epochs} and batch_size={config.batch_size} must be positive")
    dataset = data.load(config.dataset, data_dir=config.data_dir or None, holdout=config.holdout,
                        pad_to=config.pad_to or None, limit=config.limit or None)
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={config.batch_size} exceeds the "
                         f"{len(dataset.train_images)} training examples")
    model = models.get(config.model, rule=rule_spec(config), num_classes=dataset.num_classes,
                       **config.model_options.to_dict())
    optimizer = OptimizerConfig.create(config.optimizer, steps_per_epoch=steps_per_epoch)
    out = prepare_run_dir(out, overwrite)
    (out / "config.json").write_text(config.to_json(indent=2) + "\n")

    key = jax.random.key(config.seed)
    init_key, key = jax.random.split(key)
    state = train.create_train_state(init_key, model, dataset.train_images[:1], optimizer)
    train_images, train_labels = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)
    start = time.perf_counter()
    record = {}
    with open(out / "metrics.jsonl", "w") as log:
        for epoch in tqdm(range(config.epochs), desc="epochs", disable=not progress):
            epoch_start = time.perf_counter()
            state, steps = train.train_epoch(state, train_images, train_labels,
                                             jax.random.fold_in(key, epoch), config.batch_size)
            steps = jax.device_get(steps)
            if not np.all(np.isfinite(steps["loss"])):
                bad = int(np.argmin(np.isfinite(steps["loss"])))
                raise DivergenceError(f"training diverged: non-finite loss at epoch {epoch}, step "
                                      f"{bad}; lower the learning rate")
            test = train.evaluate(state, dataset.test_images, dataset.test_labels,
                                  config.eval_batch_size)
            record = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(steps["loss"])),
                "train_accuracy": float(np.mean(steps["accuracy"])),
                "test_loss": float(test["loss"]),
                "test_accuracy": float(test["accuracy"]),
                "learning_rate": float(steps["learning_rate"][0]),
                "weight_decay": float(steps["weight_decay"][0]),
                "alignment": _floats(metrics.alignment(state)),
                "epoch_time": time.perf_counter() - epoch_start,
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            if progress:
                tqdm.write(format_record(record, config.epochs))
    summary = {**record, "wall_time": time.perf_counter() - start, "steps": int(state.step)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_record(record: dict, epochs: int) -> str:
    angles = " ".join(f"{layer} {a['weight_angle']:.1f}" for layer, a in record["alignment"].items())
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {100 * record['train_accuracy']:.2f}%  test loss {record['test_loss']:.4f} "
            f"acc {100 * record['test_accuracy']:.2f}%  ({record['epoch_time']:.1f}s)\n"
            f"  feedback-kernel angle (deg): {angles}")
