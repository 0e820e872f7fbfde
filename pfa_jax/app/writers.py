"""What a run writes as it trains, behind one small interface (as clu's metric writers are): a
``MetricWriter`` takes an epoch's per-step metrics (``write_steps``), its record
(``write_epoch``, one line of ``metrics.jsonl``) and ``close``.

* ``JsonlWriter``: ``metrics.jsonl``, one JSON record per epoch after the lines kept from a
  resumed run. The file is written whole each time (``write_whole``), so no interruption loses or
  cuts a record; every process keeps the lines (the checkpoints carry their checksums), process 0
  writes them. ``drop_last`` takes back a record whose checkpoint failed.
* ``pfa_jax.app.events.TensorBoardWriter``: the same records and the per-step scalars as
  TensorBoard events.
* ``ConsoleWriter``: a progress bar over the epochs with the last epoch's train loss and accuracy
  and test accuracy, and each record in a few lines (``format_record``) above it.

``Writers`` sends every call to all of them; only process 0 writes files (``placement.writer``).
"""
from __future__ import annotations

import json
from typing import Protocol

from etils import epath
from tqdm import tqdm

from pfa_jax.app import placement
from pfa_jax.app.events import TensorBoardWriter

__all__ = ["ConsoleWriter", "format_record", "JsonlWriter", "MetricWriter", "Writers",
           "write_whole"]


class MetricWriter(Protocol):
    def write_steps(self, epoch: int, steps: dict) -> None:
        """The per-step metrics of epoch ``epoch`` (0-based; arrays over its steps)."""

    def write_epoch(self, record: dict) -> None:
        """One epoch's record."""

    def close(self) -> None: ...


def write_whole(path: epath.Path, text: str, staged_suffix: str = ".partial") -> None:
    """Writes ``text`` to ``path`` through a staged copy (``path`` + ``staged_suffix``) renamed
    over it, so no interruption leaves the file cut, also on file systems that cannot append
    (cloud storage). Writers side by side give each a suffix of its own."""
    staged = path.parent / (path.name + staged_suffix)
    staged.write_text(text)
    staged.replace(path)


class JsonlWriter:
    """``metrics.jsonl`` (module docstring); ``lines``: the records so far."""

    def __init__(self, path: epath.Path, kept: list[str], write: bool):
        self.path, self.lines, self.write = path, list(kept), write
        self._save()

    def _save(self) -> None:
        if self.write:
            write_whole(self.path, "".join(line + "\n" for line in self.lines))

    def write_steps(self, epoch: int, steps: dict) -> None:
        del epoch, steps  # metrics.jsonl holds epoch records only

    def write_epoch(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        self._save()

    def drop_last(self) -> None:
        """Takes the last record out again (its checkpoint failed)."""
        self.lines.pop()
        self._save()

    def close(self) -> None:
        pass


def _per_layer(values: dict, key: str) -> str:
    return " ".join(f"{layer} {v[key]:.1f}" for layer, v in values.items())


def format_record(record: dict, epochs: int) -> str:
    """An epoch's record in two or three lines: losses and accuracies, then the per-layer
    feedback-kernel angles and, where measured, the angles of the update to the gradient."""
    lines = [f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} "
             f"acc {100 * record['train_accuracy']:.2f}%  test loss {record['test_loss']:.4f} "
             f"acc {100 * record['test_accuracy']:.2f}%"
             + (f" bits/token {record['test_bits_per_token']:.3f}"
                if "test_bits_per_token" in record else "")
             + f"  ({record['epoch_time']:.1f}s)",
             f"  feedback-kernel angle (deg): {_per_layer(record['alignment'], 'weight_angle')}"]
    if "gradient_alignment" in record:
        lines.append("  gradient angle to BP (deg): "
                     + _per_layer(record["gradient_alignment"], "grad_angle"))
    return "\n".join(lines)


class ConsoleWriter:
    """A tqdm bar over epochs ``first`` to ``epochs`` and each epoch's ``format_record``."""

    def __init__(self, epochs: int, first: int):
        self.epochs = epochs
        self.bar = tqdm(desc="epochs", initial=first, total=epochs)

    def write_steps(self, epoch: int, steps: dict) -> None:
        del epoch, steps

    def write_epoch(self, record: dict) -> None:
        self.bar.update()
        self.bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                             acc=f"{100 * record['train_accuracy']:.2f}%",
                             test_acc=f"{100 * record['test_accuracy']:.2f}%")
        tqdm.write(format_record(record, self.epochs))

    def close(self) -> None:
        self.bar.close()


class Writers:
    """A run's writers: ``metrics.jsonl`` (its ``lines`` go into every checkpoint), TensorBoard
    events under ``out/tensorboard`` and, with ``console``, the console; files from process 0
    only. ``first``: the epochs already trained (a resumed run's events purge what follows)."""

    def __init__(self, out: epath.Path, kept: list[str], steps_per_epoch: int, first: int,
                 log_every_steps: int, epochs: int, console: bool):
        write = placement.writer()
        self.jsonl = JsonlWriter(out / "metrics.jsonl", kept, write)
        self.writers: list[MetricWriter] = [self.jsonl]
        if write:
            self.writers.append(TensorBoardWriter(out / "tensorboard", steps_per_epoch, first,
                                                  log_every_steps))
        if console:
            self.writers.append(ConsoleWriter(epochs, first))

    @property
    def lines(self) -> list[str]:
        return self.jsonl.lines

    def write_steps(self, epoch: int, steps: dict) -> None:
        for writer in self.writers:
            writer.write_steps(epoch, steps)

    def write_epoch(self, record: dict) -> None:
        for writer in self.writers:
            writer.write_epoch(record)

    def drop_last(self) -> None:
        self.jsonl.drop_last()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
