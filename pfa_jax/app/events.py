"""TensorBoard event files of a run, written with ``tensorboardX`` (no TensorFlow needed).

    events = TensorBoardWriter(out / "tensorboard", steps_per_epoch, first_epoch, log_every_steps)
    events.write_steps(epoch, steps)  # per-step loss, accuracy, learning rate every log_every_steps
    events.write_epoch(record)        # one metrics.jsonl record
    events.close()

A ``pfa_jax.app.writers.MetricWriter``.

Every scalar is logged at the global step (the number of training steps taken): a step's own
scalars (``step/loss``, ``step/accuracy``, ``step/learning_rate``, ``step/weight_decay``) at that
step, every ``log_every_steps`` steps (0: none); an epoch's record at the step that ends the epoch:
``train/loss``, ``train/accuracy``, ``test/loss``, ``test/accuracy``, ``epoch/learning_rate``,
``epoch/weight_decay``, ``epoch/time``, and per layer ``alignment/LAYER/KEY`` and
``gradient_alignment/LAYER/KEY`` (the angles and norms of ``pfa_jax.metrics``). A resumed run
purges the events at and after the first step it trains again (``purge_step``), so TensorBoard
shows each step once. ``metrics.jsonl`` stays the run's record; these files are for viewing.
"""
from __future__ import annotations

import numpy as np
from tensorboardX import SummaryWriter

__all__ = ["TensorBoardWriter"]

_EPOCH = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "test_loss": "test/loss",
          "test_accuracy": "test/accuracy", "learning_rate": "epoch/learning_rate",
          "weight_decay": "epoch/weight_decay", "epoch_time": "epoch/time"}
_STEP = ("loss", "accuracy", "learning_rate", "weight_decay")


class TensorBoardWriter:
    """The event files of one run (module docstring)."""

    def __init__(self, directory, steps_per_epoch: int, first_epoch: int = 0,
                 log_every_steps: int = 0):
        self.steps_per_epoch, self.log_every_steps = steps_per_epoch, log_every_steps
        self.writer = SummaryWriter(str(directory), purge_step=first_epoch * steps_per_epoch + 1
                                    if first_epoch else None)

    def write_steps(self, epoch: int, steps: dict) -> None:
        """The per-step scalars of epoch ``epoch`` (0-based; ``steps``: arrays over its steps)."""
        if not self.log_every_steps:
            return
        first = epoch * self.steps_per_epoch
        for i in range(self.log_every_steps - 1, len(steps["loss"]), self.log_every_steps):
            for key in _STEP:
                if key in steps:
                    self.writer.add_scalar(f"step/{key}", float(np.asarray(steps[key])[i]),
                                           first + i + 1)

    def write_epoch(self, record: dict) -> None:
        """One ``metrics.jsonl`` record, at the step that ends its epoch."""
        step = record["epoch"] * self.steps_per_epoch
        for key, tag in _EPOCH.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], step)
        for group in ("alignment", "gradient_alignment"):
            for layer, values in record.get(group, {}).items():
                for key, value in values.items():
                    self.writer.add_scalar(f"{group}/{layer}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
