"""Where a run's training data comes from, behind one small interface (``for_spec``):

* ``InMemory``: a ``pfa_jax.app.data.Dataset`` held on the device; an epoch is
  ``pfa_jax.train.train_epoch`` (one compiled scan; for conv models on CPU one compiled step per
  batch, with a step progress bar), evaluation ``pfa_jax.train.evaluate``;
* ``Streamed``: a ``pfa_jax.app.streaming.StreamedDataset`` (ImageNet); an epoch is a Python loop of one
  jitted ``train_step`` (state donated) per prefetched batch, with a step progress bar, evaluation a
  loop of jitted ``eval_step``.

A step progress bar shows the live train loss and accuracy every 10 steps.

Both place their batches with a ``pfa_jax.app.placement.Placement``: split over its devices, the
state replicated. In memory, every process holds the whole dataset, replicated on the devices, and
each device gathers and augments only its own rows of a batch inside the compiled step; streamed,
each process reads, decodes and crops only its own rows of every global batch.

Both are made from a run spec and a placement (``for_spec``) and give ``num_train``, ``sample()``
(one image for initialisation), ``heldout(n)`` (the first ``n``
test images and labels), ``train_epoch(state, key, epoch, progress)`` -> ``(state, per-step
metrics)``, ``evaluate(state)`` -> ``{'loss', 'accuracy'}`` and ``closing()`` (a ``data.Dataset``
for the closing measurements).
"""
from __future__ import annotations

import collections
import contextlib
import itertools

import jax
import numpy as np
from tqdm import tqdm

from pfa_jax import loops, train
from pfa_jax.app import data, streaming, text
from pfa_jax.app.placement import Placement
from pfa_jax.app.spec import DataSpec, RunSpec

__all__ = ["for_spec", "InMemory", "Streamed"]


def _load_options(spec: DataSpec) -> dict:
    """The keyword arguments of ``data.load`` and ``streaming.load`` that ``spec`` sets."""
    return {"data_dir": spec.data_dir, "holdout": spec.holdout, "pad_to": spec.pad_to,
            "limit": spec.limit}


def _in_memory(spec: DataSpec) -> data.Dataset:
    """The images (``data.load``) or token windows (``text.load``) of ``spec``."""
    if spec.text:
        return text.load(spec.dataset, context=spec.context, data_dir=spec.data_dir,
                         limit=spec.limit)
    return data.load(spec.dataset, **_load_options(spec))


class InMemory:
    """A ``data.Dataset`` (images or token windows) on the device: an epoch is
    ``train.train_epoch``, evaluation ``train.evaluate``."""

    def __init__(self, spec: RunSpec, placement: Placement):
        self.config, self.placement = spec.data, placement
        self.dataset = _in_memory(spec.data)
        self.num_train = len(self.dataset.train_images)
        self._placed = {}

    def sample(self) -> np.ndarray:
        return self.dataset.train_images[:1]

    def heldout(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.test_images[:count], self.dataset.test_labels[:count]

    def train_epoch(self, state, key, epoch: int, progress: bool):
        """The key alone sets the epoch's order and augmentation; ``progress`` shows a step bar
        where the epoch is a loop of steps (not a scan)."""
        loop = loops.resolve("auto", state.params)
        total = self.num_train // self.config.batch_size
        with _StepBar(epoch, total, progress and loop == "steps") as bar:
            return train.train_epoch(state, *self._split("train"), key, self.config.batch_size,
                                     self.config.augment, loop=loop, on_step=bar,
                                     sharding=self.placement.split)

    def evaluate(self, state) -> dict:
        return train.evaluate(state, *self._split("test"), self.config.eval_batch_size,
                              sharding=self.placement.split)

    def _split(self, split: str):
        """The split's images and labels, replicated on the devices (placed once)."""
        if split not in self._placed:
            self._placed[split] = self.placement.whole(
                (getattr(self.dataset, f"{split}_images"), getattr(self.dataset, f"{split}_labels")))
        return self._placed[split]

    def closing(self) -> data.Dataset:
        return self.dataset


class _StepBar:
    """A progress bar over an epoch's steps (``initial`` of them already taken), called as
    ``bar(i, metrics)`` after step ``i``; every ``every`` steps it shows that step's train loss and
    accuracy (reading them waits for the step)."""

    def __init__(self, epoch: int, total: int, show: bool, initial: int = 0, every: int = 10):
        self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}", leave=False,
                        disable=not show)
        self.every = every

    def offset(self, start: int):
        """The bar as called by a loop over the steps from step ``start`` on, counted from 0."""
        return lambda i, metrics: self(start + i, metrics)

    def __call__(self, i: int, metrics: dict) -> None:
        self.bar.update(1)
        if not self.bar.disable and i % self.every == 0:
            self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}",
                                 acc=f"{100 * float(metrics['accuracy']):.2f}%")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.bar.close()


_streamed_epoch = loops.Loop(train.train_step, donate_carry=True)
_eval_step = jax.jit(train.eval_step)


def _on_devices(batches, placement: Placement, size: int, ahead: int = 2):
    """Global batches of ``size`` from this process's parts ``batches``, put on the devices
    ``ahead`` batches before they are used."""
    queue = collections.deque()
    for batch in batches:
        queue.append(placement.batch(batch, size))
        if len(queue) > ahead:
            yield queue.popleft()
    yield from queue


class Streamed:
    """A ``streaming.StreamedDataset``: an epoch is a loop of jitted train steps over its batches,
    evaluation a loop of jitted eval steps (see the module docstring)."""

    def __init__(self, spec: RunSpec, placement: Placement):
        self.config, self.spec, self.placement = spec.data, spec, placement
        self.dataset = streaming.load(spec.data.dataset, **_load_options(spec.data),
                                      image_size=spec.data.image_size or streaming.IMAGE_SIZE,
                                      processes=spec.data.processes)
        self.num_train = self.dataset.num_train

    def sample(self) -> np.ndarray:
        return np.zeros((1,) + self.dataset.image_shape, np.float32)

    def heldout(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.arrays("test", count)

    def train_epoch(self, state, key, epoch: int, progress: bool,
                    partial_steps: dict | None = None, save_partial=None):
        """The epoch's steps from the batch after the ``partial_steps`` (their per-step metrics,
        from a run resumed in a partial epoch; None: from the first batch); every
        ``checkpoint_every_steps`` global steps short of the epoch's end,
        ``save_partial(state, steps)`` with the epoch's steps so far (a partial-epoch
        checkpoint)."""
        del key  # the batches come from (seed, epoch); the state carries its own key
        size, every = self.config.batch_size, self.spec.checkpoint_every_steps
        total = self.num_train // size
        parts = [] if partial_steps is None else [partial_steps]
        done = 0 if partial_steps is None else len(partial_steps["loss"])
        batches = self.dataset.train_batches(size, self.config.seed, epoch,
                                             self.placement.local_rows(size), start=done)
        placed = _on_devices(batches, self.placement, size)
        with contextlib.closing(batches), _StepBar(epoch, total, progress, done) as bar:
            while done < total:
                global_step = epoch * total + done
                chunk = min(total - done, every - global_step % every if every else total)
                state, steps = _streamed_epoch.steps(
                    state, itertools.islice(placed, chunk), on_step=bar.offset(done))
                parts.append(jax.device_get(steps))
                done += chunk
                if done < total and save_partial is not None:
                    save_partial(state, _concatenate(parts))
        return state, _concatenate(parts)

    def evaluate(self, state) -> dict:
        size = self.config.eval_batch_size
        batches = self.dataset.eval_batches(size, rows=self.placement.local_rows(size))
        with contextlib.closing(batches):
            results = jax.device_get([_eval_step(state, batch)
                                      for batch in _on_devices(batches, self.placement, size)])
        means = loops.weighted_mean([{k: r[k] for k in ("loss", "accuracy")} for r in results],
                                    [r["count"] for r in results])
        return {k: float(v) for k, v in means.items()}

    def closing(self) -> data.Dataset:
        sharpness, robustness = self.spec.sharpness, self.spec.robustness
        return self.dataset.subset(sharpness.examples if sharpness else 0,
                                   robustness.examples if robustness.enabled else 0)



def _concatenate(parts: list[dict]) -> dict:
    """Per-step metrics of consecutive stretches of steps, as one stretch."""
    return jax.tree.map(lambda *values: np.concatenate(values), *parts)


def for_spec(spec: RunSpec, placement: Placement) -> InMemory | Streamed:
    """The data source of ``spec.data``, its batches placed by ``placement``."""
    return (Streamed if spec.data.streamed else InMemory)(spec, placement)
