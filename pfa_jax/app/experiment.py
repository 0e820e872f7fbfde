"""One training run from a run spec (``pfa_jax.app.spec``): data -> model(rule) -> state -> compiled
epochs -> files.

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON record per
epoch: train / test loss and accuracy, learning rate, weight decay, per-layer alignment, per-layer
gradient alignment on a fixed held-out batch, epoch time), ``checkpoints/`` (orbax, after every
epoch, the newest two kept), ``curves.png`` (accuracy and alignment against the epoch,
``pfa_jax.app.plots``), ``tensorboard/`` (event files of the same records, per-layer angles and
per-step loss, accuracy and learning rate every ``log_every_steps`` steps: ``pfa_jax.app.events``)
and ``summary.json`` (the final record, ``wall_time``, ``machine`` and, when the
config asks, ``sharpness``, ``adversarial`` and ``noise``). ``wall_time`` is the time from the first
epoch to the last one's checkpoint (the closing measurements not included); a resumed run counts the
recorded epoch times of the epochs it restored, not the time lost to the interruption and the
restart. ``machine`` (``machine()``) names the hardware of the process that finished the run. The
progress bar shows the last epoch's train loss and accuracy and test accuracy; where an epoch is a
loop of steps (conv models on CPU, streamed data) an inner bar shows the live train loss and
accuracy every 10 steps (a scanned epoch is one call, so nothing finer is live there).

With ``noise_pretrain_steps`` the fresh state is first trained on noise
(``pfa_jax.app.pretrain``); ``augment`` is applied to every training batch.

``resume=True`` continues a run directory from its newest checkpoint: ``metrics.jsonl`` is cut back
to the checkpoint's epoch and training goes on to ``epochs`` (which may be larger than the
first run's). Every epoch's data order and noise come from ``(seed, epoch)`` and the state carries its
own key, so a resumed run ends with the same metrics as one never interrupted.

Gradient alignment (``pfa_jax.metrics.gradient_alignment``) uses the first ``metrics_batch_size``
test (or validation) examples, the same batch every epoch. The closing measurements: sharpness on
the first ``sharpness.examples`` training examples; adversarial and noise robustness on the first
``robustness.examples`` test examples, with epsilons and sigmas in pixel units (the images' [0, 1]
scale): the perturbation of channel ``c`` is scaled by ``1 / std_c`` of the standardisation and
adversarial images are clipped to the standardised images of pixel values 0 and 1.

Data parallel (``pfa_jax.app.placement``): the run trains on ``devices`` devices (0: every device
of every process), the state replicated and every batch split over them, evaluation and the
per-epoch gradient alignment too; the closing measurements run replicated. ``summary.json``
records ``devices`` and ``processes``. With several processes (``placement.initialize``) every
process runs the same program on its own part of each batch; only process 0 writes
``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``curves.png`` and ``summary.json``, and
orbax writes and restores the checkpoints from all of them (the run directory must be one file
system that every process sees).

Streamed datasets (``pfa_jax.app.streaming``: ``imagenet2012``) do not fit in memory. Their epochs are a
Python loop of one jitted ``train.train_step`` (state donated) per prefetched batch (an inner progress
bar counts the steps), evaluation a loop of jitted ``train.eval_step``, with the same per-epoch
records, checkpoints, resume and divergence guard. Every batch depends on ``(seed, epoch)`` only (see
``pfa_jax.app.streaming``). ``image_size`` (a config key that only these datasets take; 0 or absent: 224)
sets the crop size. ``augment`` must be ``'none'``: the training batches always get the standard
random-resized crop and flip. The fixed-batch and closing measurements use the first examples of a
split, centre-cropped as for evaluation and held in memory: gradient alignment the first
``metrics_batch_size`` validation images, sharpness the first ``sharpness.examples`` training images,
robustness the first ``robustness.examples`` validation images.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
from tqdm import tqdm

from pfa_jax import metrics, train
from pfa_jax import nn as pnn
from pfa_jax.app import config as config_lib
from pfa_jax.app import data, placement, plots, pretrain, sources, streaming
from pfa_jax.app.checkpoint import (CheckpointDamagedError, CheckpointMismatchError, Checkpoints,
                                    crc32)
from pfa_jax.app.events import Events
from pfa_jax.app.spec import RunSpec

__all__ = ["check_fits", "DivergenceError", "format_record", "load_config", "machine", "run"]


class DivergenceError(RuntimeError):
    """The training loss or the parameters became non-finite."""


def _check_finite(state, losses, epoch: int, out: epath.Path) -> None:
    """Raises ``DivergenceError`` naming the epoch (1-based) and step of the first non-finite loss,
    or the epoch whose parameters are non-finite; earlier epochs' checkpoints stay as they are."""
    finite = np.isfinite(losses)
    params_finite = all(bool(np.all(np.isfinite(p))) for p in jax.tree.leaves(state.params))
    if finite.all() and params_finite:
        return
    where = f"step {int(np.argmin(finite)) + 1}" if not finite.all() else "its end (parameters)"
    kept = (f"The last good checkpoint (after epoch {epoch}) is kept in {out / 'checkpoints'}; "
            "lower the learning rate and start again, or --resume with a changed config"
            ) if epoch else ("No epoch completed, so no checkpoint was written; lower the learning "
                             "rate and start again (--overwrite)")
    raise DivergenceError(f"training diverged in epoch {epoch + 1} at {where}: non-finite values. "
                          f"{kept}")


def _prepare_run_dir(out: str | epath.Path, overwrite: bool) -> epath.Path:
    """An empty run directory ``out``: every process checks it before process 0 empties it."""
    out = epath.Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a run directory; choose another --out")
    replace = out.exists() and any(out.iterdir())
    if replace and not overwrite:
        raise FileExistsError(f"run directory {out} already exists; pass --resume to continue "
                              "it, --overwrite to replace it, or choose another --out")
    placement.barrier("pfa_jax: run directory checked")
    if replace and placement.writer():
        out.rmtree()
    placement.barrier("pfa_jax: run directory emptied")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FileExistsError(f"cannot create the run directory {out}: {error.strerror} "
                              f"({error.filename}); choose another --out") from None
    return out


def _floats(tree):
    return jax.tree.map(lambda x: float(x), jax.device_get(tree))


def check_fits(model, name: str, dataset: data.Dataset | streaming.StreamedDataset) -> None:
    """Raises if the model cannot take the dataset's images (traced with shapes only, no compile),
    or if ``rule.layers`` names a layer the model does not have."""
    try:
        jax.eval_shape(model.init, {"params": jax.random.key(0)},
                       jax.ShapeDtypeStruct((1,) + dataset.image_shape, jnp.float32))
    except pnn.RuleMapError as error:
        raise ValueError(f"config rule.layers: {error}") from None
    except Exception as error:  # noqa: BLE001 - any other tracing failure: the shapes do not fit
        raise ValueError(f"config model={name!r} does not fit {dataset.name} images of shape "
                         f"{dataset.image_shape} ({type(error).__name__}: {error}); choose another "
                         "model or pad_to") from None


def _split(images, labels, count: int, batch_size: int, where: placement.Placement) -> list[dict]:
    """The first ``count`` examples as batches of at most ``batch_size``, replicated on the
    devices of ``where``."""
    return where.whole([{"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}
                        for i in range(0, min(count, len(labels)), batch_size)])


def _closing_metrics(state, dataset: data.Dataset, spec: RunSpec, key,
                     where: placement.Placement) -> dict:
    """Sharpness, adversarial and noise robustness, as far as ``spec`` asks for them."""
    results, sharp, robust = {}, spec.sharpness, spec.robustness
    batch_size = spec.data.eval_batch_size
    if sharp is not None:
        batches = _split(dataset.train_images, dataset.train_labels, sharp.examples, batch_size,
                         where)
        results["sharpness"] = metrics.sharpness(
            state, batches, jax.random.fold_in(key, 0), iterations=sharp.iterations,
            tolerance=sharp.tolerance, probes=sharp.probes)
    test = _split(dataset.test_images, dataset.test_labels, robust.examples, batch_size, where)
    mean, std = np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)
    pixels = {"scale": 1.0 / std, "lower": -mean / std, "upper": (1.0 - mean) / std}
    if robust.adversarial_epsilons:
        results["adversarial"] = {attack: metrics.adversarial(
            state, test, robust.adversarial_epsilons, attack, jax.random.fold_in(key, 1),
            steps=robust.pgd_steps, **pixels) for attack in robust.attacks}
    if robust.noise_sigmas:
        results["noise"] = metrics.corruption(state, test, robust.noise_sigmas,
                                              jax.random.fold_in(key, 2), **pixels)
    return results


def load_config(out: str | epath.Path) -> ml_collections.ConfigDict:
    """The resolved config of an existing run directory (errors name the file)."""
    path = epath.Path(out) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {out} is not a run directory to resume")
    try:
        return config_lib.from_json(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: {error}") from None


def _metrics_lines(path: epath.Path, epochs: int, crcs: np.ndarray | None) -> list[str]:
    """The first ``epochs`` lines of ``metrics.jsonl``, each checked to be a JSON record and, where
    the checkpoint saved them (``crcs``), to be the line the run wrote; errors name the line."""
    try:
        lines = path.read_text().splitlines()[:epochs]
    except (OSError, UnicodeDecodeError) as error:
        raise FileNotFoundError(f"{path} cannot be read ({error}); the checkpoint after epoch "
                                f"{epochs} needs its first {epochs} records") from None
    if len(lines) < epochs:
        raise ValueError(f"{path} has {len(lines)} records; the checkpoint after epoch {epochs} "
                         f"needs {epochs}: the file was cut after the run wrote it")
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)["epoch_time"]
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{path} line {number} is not a metrics record "
                             f"({type(error).__name__}: {error})") from None
        if crcs is not None and (number > len(crcs) or crcs[number - 1] != crc32(line)):
            raise ValueError(f"{path} line {number} differs from the record saved with the "
                             f"checkpoint after epoch {epochs} (checksum): the file was changed "
                             "after the run wrote it")
    return lines


def _config_changes(out: epath.Path, config: ml_collections.ConfigDict) -> str:
    """The keys in which ``config`` differs from the run directory's ``config.json``."""
    saved, new = (traverse_util.flatten_dict(c.to_dict(), sep=".")
                  for c in (load_config(out), config))
    changed = [f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(saved) | set(new))
               if saved.get(k) != new.get(k)]
    return ", ".join(changed) or "none"


def _resume(out: epath.Path, checkpoints: Checkpoints, spec: RunSpec, like
            ) -> tuple[int, train.TrainState, list[str], list[str]]:
    """(completed epochs, restored state, metrics lines kept, errors of the damaged checkpoints
    skipped) from the newest intact checkpoint; an intact checkpoint of another state (the config
    changed) or none intact raises, naming them."""
    steps = checkpoints.steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {out / 'checkpoints'} to resume from")
    if steps[0] > spec.epochs:
        raise ValueError(f"epochs={spec.epochs} is fewer than the {steps[0]} epochs already "
                         "checkpointed")
    damaged = []
    for done in steps:
        try:
            state, crcs = checkpoints.restore(done, like)
        except CheckpointDamagedError as error:
            damaged.append(str(error))
            continue
        except CheckpointMismatchError as error:
            raise CheckpointMismatchError(
                f"{error}. The config differs from the run's {out / 'config.json'} in "
                f"{_config_changes(out, spec.config)}: resume with the run's own config (another "
                "rule, model or optimizer needs a new run, another --out); the checkpoints are "
                "intact and left as they are") from None
        return done, state, _metrics_lines(out / "metrics.jsonl", done, crcs), damaged
    raise CheckpointDamagedError(
        f"no intact checkpoint in {out / 'checkpoints'} to resume from: " + "; ".join(damaged)
        + ". They are left as they are; start a new run (--overwrite or another --out)")


def _set_aside(out: epath.Path, checkpoints: Checkpoints, damaged: list[str], done: int) -> None:
    """Moves the checkpoints newer than ``done`` (the damaged ones) to ``out/damaged-checkpoints``,
    saying so on stderr; the resumed run writes its own checkpoints of those epochs. Process 0
    moves them once every process has read the directory."""
    placement.barrier("pfa_jax: checkpoints read")
    for epoch in [e for e in checkpoints.steps() if e > done and placement.writer()]:
        (out / "damaged-checkpoints").mkdir(exist_ok=True)
        target = out / "damaged-checkpoints" / str(epoch)
        for copy in itertools.count(2):
            if not target.exists():
                break
            target = out / "damaged-checkpoints" / f"{epoch}.{copy}"
        checkpoints.path(epoch).rename(target)
    placement.barrier("pfa_jax: damaged checkpoints set aside")
    checkpoints.reload()
    for error in damaged if placement.writer() else ():
        print(f"pfa-jax: warning: {error}; moved to {out / 'damaged-checkpoints'}. Resuming "
              f"from the checkpoint after epoch {done}, the newest intact one", file=sys.stderr)


def machine() -> str:
    """The hardware this process trains on, in a few words: the accelerator's kind and count
    (``'NVIDIA H100 80GB HBM3'``, ``'4 x TPU v4'``), or ``'CPU, N cores'``."""
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return f"CPU, {os.cpu_count()} cores"
    kind = devices[0].device_kind
    return kind if len(devices) == 1 else f"{len(devices)} x {kind}"


def _prepare(spec: RunSpec, out, overwrite: bool, resume: bool, init_key):
    """The devices, the data source, the state (restored from the newest checkpoint when
    resuming), the held-out batch, the run directory, its checkpoints and the metrics lines kept
    from a resumed run. Everything is checked before anything in ``out`` changes; only then is
    ``config.json`` written, so a failed start leaves the run directory as it was."""
    where = placement.Placement.create(spec.devices)
    for key in ("batch_size", "eval_batch_size"):
        where.check_divides(key, getattr(spec.data, key))
    source = sources.for_spec(spec, where)
    steps_per_epoch = source.num_train // spec.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={spec.data.batch_size} exceeds the "
                         f"{source.num_train} training examples")
    check_fits(spec.model, spec.config.model, source.dataset)
    tx = dataclasses.replace(spec.optimizer, steps_per_epoch=steps_per_epoch)
    size = spec.metrics_batch_size
    heldout = _split(*source.heldout(size), size, size, where)[0] if size else None
    state = where.whole(train.create_train_state(init_key, spec.model, source.sample(), tx))
    first, kept = 0, []
    if resume:
        out = epath.Path(out)
        checkpoints = Checkpoints(out / "checkpoints")
        first, state, kept, damaged = _resume(out, checkpoints, spec, state)
        if damaged:
            _set_aside(out, checkpoints, damaged, first)
    else:
        out = _prepare_run_dir(out, overwrite)
        checkpoints = Checkpoints(out / "checkpoints")
    placement.barrier("pfa_jax: run directory read")  # before process 0 writes into it
    if placement.writer():
        (out / "config.json").write_text(spec.config.to_json(indent=2) + "\n")
    return where, source, state, heldout, out, checkpoints, first, kept


def _epoch_record(state, steps, test: dict, heldout, epoch: int, epoch_time: float) -> dict:
    """One line of ``metrics.jsonl``."""
    gradients = {} if heldout is None else {
        "gradient_alignment": _floats(metrics.gradient_alignment(state, heldout))}
    logged = {k: float(steps[k][0]) for k in ("learning_rate", "weight_decay") if k in steps}
    return {"epoch": epoch + 1, "train_loss": float(np.mean(steps["loss"])),
            "train_accuracy": float(np.mean(steps["accuracy"])),
            "test_loss": float(test["loss"]), "test_accuracy": float(test["accuracy"]),
            **logged, "alignment": _floats(metrics.alignment(state)), **gradients,
            "epoch_time": epoch_time}


class _Records:
    """What a run writes as it trains, on process 0 only: ``metrics.jsonl`` (the lines kept from
    a resumed run, then one more per epoch) and the TensorBoard events. ``metrics.jsonl`` is
    written whole each time and put in place by a rename, so no interruption loses or cuts a
    record, also on file systems that cannot append (cloud storage). Every process keeps the
    lines (the checkpoints carry their checksums)."""

    def __init__(self, out: epath.Path, kept: list[str], spec: RunSpec, steps_per_epoch: int,
                 first: int):
        self.out, self.lines, self.write = out, list(kept), placement.writer()
        if self.write:
            self._save()
            self.events = Events(out / "tensorboard", steps_per_epoch, first, spec.log_every_steps)

    def _save(self) -> None:
        staged = self.out / "metrics.jsonl.partial"
        staged.write_text("".join(line + "\n" for line in self.lines))
        staged.replace(self.out / "metrics.jsonl")

    def steps(self, epoch: int, steps: dict) -> None:
        if self.write:
            self.events.steps(epoch, steps)

    def epoch(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        if self.write:
            self._save()
            self.events.epoch(record)

    def close(self) -> None:
        if self.write:
            self.events.close()


def run(spec: RunSpec, out: str | epath.Path, overwrite: bool = False, progress: bool = True,
        resume: bool = False) -> dict:
    """Trains the run ``spec`` (``pfa_jax.app.spec.resolve``) and writes the run directory ``out``
    (``resume``: continues it from its newest checkpoint); returns the summary."""
    init_key, key = jax.random.split(jax.random.key(spec.seed))
    where, source, state, heldout, out, checkpoints, first, kept = _prepare(
        spec, out, overwrite, resume, init_key)
    if not first and spec.noise_pretrain_steps:
        state, _ = pretrain.noise_pretrain(state, jax.random.fold_in(key, 2**31),
                                           spec.noise_pretrain_steps, spec.data.batch_size,
                                           source.dataset.num_classes)
    progress = progress and placement.writer()
    record = json.loads(kept[-1]) if kept else {}
    start = time.perf_counter() - sum(json.loads(line)["epoch_time"] for line in kept)
    records = _Records(out, kept, spec, source.num_train // spec.data.batch_size, first)
    with contextlib.closing(records):
        bar = tqdm(range(first, spec.epochs), desc="epochs", disable=not progress,
                   initial=first, total=spec.epochs)
        for epoch in bar:
            epoch_start = time.perf_counter()
            state, steps = source.train_epoch(state, jax.random.fold_in(key, epoch), epoch,
                                              progress)
            steps = jax.device_get(steps)
            records.steps(epoch, steps)
            _check_finite(state, steps["loss"], epoch, out)
            record = _epoch_record(state, steps, source.evaluate(state), heldout, epoch,
                                   time.perf_counter() - epoch_start)
            records.epoch(record)
            checkpoints.save(epoch + 1, state, records.lines)
            bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                            acc=f"{100 * record['train_accuracy']:.2f}%",
                            test_acc=f"{100 * record['test_accuracy']:.2f}%")
            if progress:
                tqdm.write(format_record(record, spec.epochs))
    wall_time = time.perf_counter() - start
    if placement.writer():
        plots.run_curves([json.loads(line) for line in records.lines], out / "curves.png",
                         title=spec.title)
    summary = {**record, "wall_time": wall_time, "steps": int(state.step), "machine": machine(),
               "devices": where.size, "processes": jax.process_count(),
               **_closing_metrics(state, source.closing(), spec,
                                  jax.random.fold_in(key, spec.epochs), where)}
    if placement.writer():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _per_layer(values: dict, key: str) -> str:
    return " ".join(f"{layer} {v[key]:.1f}" for layer, v in values.items())


def format_record(record: dict, epochs: int) -> str:
    lines = [f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} "
             f"acc {100 * record['train_accuracy']:.2f}%  test loss {record['test_loss']:.4f} "
             f"acc {100 * record['test_accuracy']:.2f}%  ({record['epoch_time']:.1f}s)",
             f"  feedback-kernel angle (deg): {_per_layer(record['alignment'], 'weight_angle')}"]
    if "gradient_alignment" in record:
        lines.append("  gradient angle to BP (deg): "
                     + _per_layer(record["gradient_alignment"], "grad_angle"))
    return "\n".join(lines)
