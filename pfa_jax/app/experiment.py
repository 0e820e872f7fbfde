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
records, checkpoints, resume and divergence guard. Every batch depends on ``(seed, epoch, batch
index)`` only (see ``pfa_jax.app.streaming``), prepared by grain in threads or, with
``data_processes``, worker processes. With ``checkpoint_every_steps = n`` a checkpoint is also
written every ``n`` global steps within an epoch into ``step-checkpoints/`` (keyed by global step,
the newest two kept; none at an epoch's end, where ``checkpoints/`` gets one), carrying the
epoch, the next batch, the steps per epoch, the epoch's per-step metrics so far and its elapsed
time; ``resume`` continues from the newest checkpoint of either kind, the batches from the next
one on, so the epoch's record and every step are those of an uninterrupted run. A mid-epoch
checkpoint is written only if the epoch's losses so far and the parameters are finite.
``image_size`` (a config key that only these datasets take; 0 or absent: 224)
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
from collections.abc import Callable

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
from pfa_jax.app import data, placement, plots, pretrain, rundir, sources, streaming
from pfa_jax.app.checkpoint import (CheckpointDamagedError, CheckpointMismatchError, Checkpoints,
                                    crc32)
from pfa_jax.app.events import Events
from pfa_jax.app.spec import RunSpec

__all__ = ["check_fits", "DivergenceError", "format_record", "load_config", "machine", "MIDWAY",
           "run"]

MIDWAY = "step-checkpoints"  # the mid-epoch checkpoints of a run directory, keyed by global step


class DivergenceError(RuntimeError):
    """The training loss or the parameters became non-finite. ``diagnosis``: what diverged and
    where (epoch, step), without the machine's paths; the message adds the checkpoint kept and
    what to do."""

    def __init__(self, diagnosis: str, advice: str):
        super().__init__(f"{diagnosis}. {advice}")
        self.diagnosis = diagnosis


def _check_finite(state, losses, epoch: int, start: _Start) -> None:
    """Raises ``DivergenceError`` naming the epoch (1-based) and step of the first non-finite loss
    (``losses``: the epoch's so far), or the epoch whose parameters are non-finite, and the newest
    checkpoint, which stays as it is with the older ones."""
    finite = np.isfinite(losses)
    params_finite = all(bool(np.all(np.isfinite(p))) for p in jax.tree.leaves(state.params))
    if finite.all() and params_finite:
        return
    where = (f"step {int(np.argmin(finite)) + 1}" if not finite.all()
             else f"step {len(losses)} (the parameters)")
    found = _found(start.checkpoints, start.midway, start.steps_per_epoch)
    kept = (f"The last good checkpoint ({_when(found[0][0], start.steps_per_epoch)}) is kept in "
            f"{found[0][1].directory}; lower the learning rate and start again (--overwrite "
            "keeps this run until the new one checkpoints)") if found else (
        "No epoch completed, so no checkpoint was written; lower the learning rate and start "
        "again (--overwrite)")
    raise DivergenceError(f"training diverged in epoch {epoch + 1} at {where}: non-finite values",
                          kept)


def _floats(tree):
    return jax.tree.map(lambda x: float(x), jax.device_get(tree))


def check_fits(model, name: str, dataset: data.Dataset | streaming.StreamedDataset) -> None:
    """Raises if the model cannot take the dataset's images (traced with shapes only, no compile),
    or if ``rule.layers`` names a layer the model does not have."""
    dtype = dataset.train_images.dtype if isinstance(dataset, data.Dataset) else jnp.float32
    try:
        jax.eval_shape(model.init, {"params": jax.random.key(0)},
                       jax.ShapeDtypeStruct((1,) + dataset.image_shape, dtype))
    except pnn.RuleMapError as error:
        raise ValueError(f"config rule.layers: {error}") from None
    except pnn.UnreachedLayerError as error:
        raise ValueError(f"config model={name!r}: {error}") from None
    except Exception as error:  # noqa: BLE001 - any other tracing failure: the shapes do not fit
        raise ValueError(f"config model={name!r} does not fit {dataset.name} images of shape "
                         f"{dataset.image_shape} ({type(error).__name__}: {error}); choose another "
                         "model or pad_to") from None


def _split(images, labels, count: int, batch_size: int, where: placement.Placement) -> list[dict]:
    """The first ``count`` examples as batches of at most ``batch_size``, replicated on the
    devices of ``where``."""
    return where.whole([{"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}
                        for i in range(0, min(count, len(labels)), batch_size)])


def pixel_units(dataset: data.Dataset) -> dict:
    """``scale``, ``lower``, ``upper`` for ``pfa_jax.metrics``' attacks and noise on standardised
    images: radii in pixel units, results kept within the pixel range [0, 1]."""
    mean, std = np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)
    return {"scale": 1.0 / std, "lower": -mean / std, "upper": (1.0 - mean) / std}


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
    pixels = pixel_units(dataset)
    if robust.adversarial_epsilons:
        results["adversarial"] = {attack: metrics.adversarial(
            state, test, robust.adversarial_epsilons, attack, jax.random.fold_in(key, 1),
            steps=robust.pgd_steps, **pixels) for attack in robust.attacks}
    if robust.noise_sigmas:
        results["noise"] = metrics.corruption(state, test, robust.noise_sigmas,
                                              jax.random.fold_in(key, 2), **pixels)
    return results


def load_config(out: str | epath.Path) -> ml_collections.ConfigDict:
    """The resolved config of an existing run directory (errors name the file). A PFA run written
    before PFA had storage forms (no ``rule.options.form``) gets ``form='R'``, the arrays its
    checkpoints hold; a DFA run written before ``grid='output'`` became the default (no
    ``rule.options.grid``) keeps ``grid='input'``, the projection it trained with."""
    path = epath.Path(out) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {out} is not a run directory to resume")
    try:
        config = config_lib.from_json(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: {error}") from None
    if config.rule.name in ("pfa", "pfa_o") and "form" not in config.rule.options:
        config.rule.options.form = "R"
    if config.rule.name == "dfa" and "grid" not in config.rule.options:
        config.rule.options.grid = "input"  # the default before the references' "output"
    return config


def _metrics_lines(path: epath.Path, epochs: int, crcs: np.ndarray | None) -> list[str]:
    """The first ``epochs`` lines of ``metrics.jsonl``, each checked to be a JSON record and, where
    the checkpoint saved them (``crcs``), to be the line the run wrote; errors name the line."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise FileNotFoundError(f"{path} cannot be read ({error}); the checkpoint after epoch "
                                f"{epochs} needs its first {epochs} records") from None
    if len(lines) > epochs and placement.writer():
        print(f"pfa-jax: warning: {path.name} has {len(lines) - epochs} record(s) past the "
              f"checkpoint after epoch {epochs} (their checkpoint damaged or not written before an "
              "interruption, or added by hand); the resumed run replaces them with its own",
              file=sys.stderr)
    lines = lines[:epochs]
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


# the keys a resume may change (they do not change what is trained), and the sections ("x.")
RESUMABLE = ("epochs", "devices", "data_dir", "data_processes", "eval_batch_size",
             "metrics_batch_size", "log_every_steps", "checkpoint_every_steps", "sharpness.",
             "robustness.")


def _changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
    """``'key: saved -> new'`` for every key in which ``config`` differs from ``saved``."""
    old, new = (traverse_util.flatten_dict(c.to_dict(), sep=".") for c in (saved, config))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _trained_under(out: epath.Path, text: str | None) -> tuple[ml_collections.ConfigDict, str]:
    """The config a checkpoint was trained under (``text``, saved with it) and what it is, or,
    for a checkpoint saved without one, the run's ``config.json``."""
    if text is None:
        return load_config(out), f"the run's {out / 'config.json'}"
    return config_lib.from_json(text), "the config the checkpoint was trained under"


def _check_resumable(out: epath.Path, text: str | None, config, when: str) -> None:
    """Refuses a resume whose config changes a key outside ``RESUMABLE`` from the one the
    checkpoint was trained under, naming every such key."""
    if text is None:
        return
    changed = [c for c in _changes(config_lib.from_json(text), config)
               if not c.startswith(RESUMABLE)]
    if changed:
        raise ValueError(
            f"the checkpoint {when} in {out} was trained under another config: "
            f"{'; '.join(changed)} (config.json edited, or --set). A resume may change only "
            f"{', '.join(k.replace('.', '.*') for k in RESUMABLE)}; another rule, model, "
            "optimizer or data needs a new run (another --out, or --overwrite). Nothing was "
            "changed")


def _progress(position: int, steps_per_epoch: int) -> str:
    """A global step in words: ``'2 epochs'`` or ``'2 epochs and 5 steps'``."""
    epochs, steps = divmod(position, steps_per_epoch)
    return f"{epochs} epochs" + (f" and {steps} steps" if steps else "")


def _when(position: int, steps_per_epoch: int) -> str:
    """A checkpoint's global step in words: ``'after epoch 2'`` or ``'at step 5 of epoch 3'``."""
    epochs, steps = divmod(position, steps_per_epoch)
    return f"at step {steps} of epoch {epochs + 1}" if steps else f"after epoch {epochs}"


def _found(checkpoints: Checkpoints, midway: Checkpoints | None, steps_per_epoch: int) -> list:
    """Every checkpoint as ``(global step, its Checkpoints, key, name)``, newest first."""
    found = [(e * steps_per_epoch, checkpoints, e, str(e)) for e in checkpoints.steps()]
    found += [(g, midway, g, f"step-{g}") for g in (midway.steps() if midway else [])]
    return sorted(found, key=lambda f: f[0], reverse=True)


@dataclasses.dataclass
class _Resumed:
    """Where a resumed run starts: ``first`` completed epochs, the ``state``, the metrics lines
    ``kept``; from a mid-epoch checkpoint the per-step metrics ``taken`` in epoch ``first`` and
    the time it had run (``elapsed``); the errors of the damaged checkpoints skipped and those
    checkpoints (``newer``: ``(Checkpoints, key, name)``), all newer than the one resumed from."""

    first: int
    state: train.TrainState
    kept: list[str]
    taken: dict | None = None
    elapsed: float = 0.0
    damaged: list[str] = dataclasses.field(default_factory=list)
    newer: list = dataclasses.field(default_factory=list)
    when: str = ""  # the checkpoint resumed from, in words (``_when``)


def _within(within: dict, path: epath.Path, steps_per_epoch: int) -> tuple[dict, float]:
    """The per-step metrics and elapsed time of a mid-epoch checkpoint, once its steps per epoch
    are checked to be this config's."""
    saved = int(within["steps_per_epoch"])
    if saved != steps_per_epoch:
        raise ValueError(f"checkpoint {path} was written mid-epoch with {saved} steps per epoch; "
                         f"this config gives {steps_per_epoch} (batch_size or limit changed): "
                         "resume with the run's own config")
    return within["steps"], float(within["elapsed"])


def _resume(out: epath.Path, checkpoints: Checkpoints, midway: Checkpoints | None, spec: RunSpec,
            like, steps_per_epoch: int) -> _Resumed:
    """The newest intact checkpoint, epoch-end or mid-epoch, restored; an intact checkpoint of
    another state (the config changed) or none intact raises, naming them."""
    found = _found(checkpoints, midway, steps_per_epoch)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {out / 'checkpoints'} to resume from")
    if found[0][0] > spec.epochs * steps_per_epoch:
        raise ValueError(f"epochs={spec.epochs} is fewer than the "
                         f"{_progress(found[0][0], steps_per_epoch)} already checkpointed")
    damaged = []
    for number, (position, holder, key, _) in enumerate(found):
        try:
            restored = holder.restore(key, like)
        except CheckpointDamagedError as error:
            damaged.append(str(error))
            continue
        except CheckpointMismatchError as error:
            saved, what = _trained_under(out, error.config)
            raise CheckpointMismatchError(
                f"{error}. The config differs from {what} in "
                f"{', '.join(_changes(saved, spec.config)) or 'none'}: resume with the run's own "
                "config (another rule, model or optimizer needs a new run, another --out); the "
                "checkpoints are intact and left as they are") from None
        taken, elapsed = (None, 0.0) if restored.within is None else _within(
            restored.within, holder.path(key), steps_per_epoch)
        _check_resumable(out, restored.config, spec.config, _when(position, steps_per_epoch))
        done = position // steps_per_epoch
        return _Resumed(done, restored.state,
                        _metrics_lines(out / "metrics.jsonl", done, restored.records), taken,
                        elapsed, damaged, [f[1:] for f in found[:number]],
                        _when(position, steps_per_epoch))
    raise CheckpointDamagedError(
        f"no intact checkpoint in {out / 'checkpoints'} to resume from: " + "; ".join(damaged)
        + ". They are left as they are; start a new run (--overwrite or another --out)")


def _set_aside(out: epath.Path, resumed: _Resumed, directory: rundir.RunDirectory) -> None:
    """Moves the checkpoints newer than the one resumed from (the damaged ones) to
    ``out/damaged-checkpoints``, saying so on stderr; the resumed run writes its own checkpoints
    of those steps. Process 0 moves them once every process has read the directory."""
    placement.barrier("pfa_jax: checkpoints read")
    for holder, key, name in resumed.newer if placement.writer() else ():
        (out / "damaged-checkpoints").mkdir(exist_ok=True)
        target = out / "damaged-checkpoints" / name
        for copy in itertools.count(2):
            if not target.exists():
                break
            target = out / "damaged-checkpoints" / f"{name}.{copy}"
        directory.rename(holder.path(key), target)
    placement.barrier("pfa_jax: damaged checkpoints set aside")
    for holder in {id(h): h for h, _, _ in resumed.newer}.values():
        holder.reload()
    for error in resumed.damaged if placement.writer() else ():
        print(f"pfa-jax: warning: {error}; moved to {out / 'damaged-checkpoints'}. Resuming "
              f"from the checkpoint {resumed.when}, the newest intact one", file=sys.stderr)


def machine() -> str:
    """The hardware this process trains on, in a few words: the accelerator's kind and count
    (``'NVIDIA H100 80GB HBM3'``, ``'4 x TPU v4'``), or ``'CPU, N cores'``."""
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return f"CPU, {os.cpu_count()} cores"
    kind = devices[0].device_kind
    return kind if len(devices) == 1 else f"{len(devices)} x {kind}"


@dataclasses.dataclass
class _Start:
    """What a run starts from (``_prepare``)."""

    where: placement.Placement
    source: sources.InMemory | sources.Streamed
    heldout: dict | None
    out: epath.Path
    checkpoints: Checkpoints  # one per completed epoch
    midway: Checkpoints | None  # mid-epoch, keyed by global step (checkpoint_every_steps)
    steps_per_epoch: int
    resumed: _Resumed
    config: str  # the resolved config's text, saved with every checkpoint


def _claim(directory: rundir.RunDirectory, overwrite: bool) -> None:
    """A new run's directory: refused if it holds a run and ``overwrite`` is not set, else that
    run set aside (``rundir``); every process checks it before process 0 moves anything."""
    held = directory.holds_a_run()
    if held and not overwrite:
        raise FileExistsError(f"run directory {directory.out} already exists; pass --resume to "
                              "continue it, --overwrite to replace it, or choose another --out")
    placement.barrier("pfa_jax: run directory checked")
    if held:
        directory.set_aside()
    placement.barrier("pfa_jax: run directory emptied")


def _prepare(spec: RunSpec, directory: rundir.RunDirectory, overwrite: bool, resume: bool,
             init_key) -> _Start:
    """The devices, the data source, the held-out batch, the run directory, its checkpoints and
    where the run starts (restored from the newest checkpoint when resuming). Everything is
    checked before anything in ``out`` changes; only then is ``config.json`` written (and
    ``directory`` undoes it all if the run fails before its first checkpoint)."""
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
    state = where.whole(train.create_train_state(init_key, spec.model, source.sample(), tx,
                                                 loss=spec.loss))
    out = directory.out
    if not resume:
        _claim(directory, overwrite)
    directory.begin()
    checkpoints = Checkpoints(out / "checkpoints")
    midway = (Checkpoints(out / MIDWAY) if spec.checkpoint_every_steps or (out / MIDWAY).exists()
              else None)
    if resume:
        resumed = _resume(out, checkpoints, midway, spec, state, steps_per_epoch)
        if resumed.damaged:
            _set_aside(out, resumed, directory)
    else:
        resumed = _Resumed(0, state, [])
    placement.barrier("pfa_jax: run directory read")  # before process 0 writes into it
    if placement.writer():
        write_whole(out / "config.json", spec.config.to_json(indent=2) + "\n")
    return _Start(where, source, heldout, out, checkpoints, midway, steps_per_epoch, resumed,
                  spec.config.to_json(indent=2))


def _epoch_record(state, steps, test: dict, heldout, epoch: int, epoch_time: float) -> dict:
    """One line of ``metrics.jsonl``."""
    gradients = {} if heldout is None else {
        "gradient_alignment": _floats(metrics.gradient_alignment(state, heldout))}
    logged = {k: float(steps[k][0]) for k in ("learning_rate", "weight_decay") if k in steps}
    measured = {f"{split}_{k}": float(np.mean(values[k]))
                for split, values in (("train", steps), ("test", test))
                for k in ("loss", "accuracy", "bits_per_token") if k in values}
    return {"epoch": epoch + 1, **measured, **logged, "alignment": _floats(metrics.alignment(state)),
            **gradients, "epoch_time": epoch_time}


def write_whole(path: epath.Path, text: str, staged_suffix: str = ".partial") -> None:
    """Writes ``text`` to ``path`` through a staged copy (``path`` + ``staged_suffix``) renamed
    over it, so no interruption leaves the file cut, also on file systems that cannot append
    (cloud storage). Writers side by side give each a suffix of its own."""
    staged = path.parent / (path.name + staged_suffix)
    staged.write_text(text)
    staged.replace(path)


class _Records:
    """What a run writes as it trains, on process 0 only: ``metrics.jsonl`` (the lines kept from
    a resumed run, then one more per epoch) and the TensorBoard events. ``metrics.jsonl`` is
    written whole each time (``write_whole``), so no interruption loses or cuts a record. Every
    process keeps the lines (the checkpoints carry their checksums)."""

    def __init__(self, out: epath.Path, kept: list[str], spec: RunSpec, steps_per_epoch: int,
                 first: int):
        self.out, self.lines, self.write = out, list(kept), placement.writer()
        if self.write:
            self._save()
            self.events = Events(out / "tensorboard", steps_per_epoch, first, spec.log_every_steps)

    def _save(self) -> None:
        write_whole(self.out / "metrics.jsonl", "".join(line + "\n" for line in self.lines))

    def steps(self, epoch: int, steps: dict) -> None:
        if self.write:
            self.events.steps(epoch, steps)

    def epoch(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        if self.write:
            self._save()
            self.events.epoch(record)

    def drop_last(self) -> None:
        """Takes the last record out of ``metrics.jsonl`` again (its checkpoint failed)."""
        self.lines.pop()
        if self.write:
            self._save()

    def close(self) -> None:
        if self.write:
            self.events.close()


def _midway_save(start: _Start, records: _Records, epoch: int, epoch_start: float,
                 saved: Callable[[], None]):
    """``save(state, taken)`` for ``Streamed.train_epoch``: a mid-epoch checkpoint at the global
    step after the epoch's steps ``taken``, once their losses and the parameters are finite;
    then ``saved()``."""
    def save(state, taken: dict) -> None:
        done = len(taken["loss"])
        _check_finite(state, taken["loss"], epoch, start)
        within = {"steps": taken, "epoch": epoch, "next_batch": done,
                  "steps_per_epoch": start.steps_per_epoch,
                  "elapsed": time.perf_counter() - epoch_start}
        start.midway.save(epoch * start.steps_per_epoch + done, state, records.lines, within,
                          start.config)
        saved()
    return save


def run(spec: RunSpec, out: str | epath.Path, overwrite: bool = False, progress: bool = True,
        resume: bool = False) -> dict:
    """Trains the run ``spec`` (``pfa_jax.app.spec.resolve``) and writes the run directory ``out``
    (``resume``: continues it from its newest checkpoint); returns the summary. The directory is
    locked for the run and left as it was if the run fails before its first checkpoint
    (``pfa_jax.app.rundir``). A resume with no epoch left to train returns the run's summary as
    it is and writes nothing."""
    init_key, key = jax.random.split(jax.random.key(spec.seed))
    with rundir.RunDirectory(out, writer=placement.writer()) as directory:
        start = _prepare(spec, directory, overwrite, resume, init_key)
        state = start.resumed.state
        if resume and start.resumed.first == spec.epochs and (start.out / "summary.json").exists():
            return json.loads((start.out / "summary.json").read_text())
        if not resume:
            state = pretrained(spec, start, state, key)
        begun = (time.perf_counter() - start.resumed.elapsed
                 - sum(json.loads(line)["epoch_time"] for line in start.resumed.kept))
        records = _Records(start.out, start.resumed.kept, spec, start.steps_per_epoch,
                           start.resumed.first)
        with contextlib.closing(records):
            state = _train(spec, start, state, key, records, directory.commit,
                           progress and placement.writer())
        summary = _summary(spec, start, state, key, records, time.perf_counter() - begun)
        directory.commit()
        return summary


def pretrained(spec: RunSpec, start: _Start, state, key):
    """A new run's state after its noise pretraining (``spec.noise_pretrain_steps``; none: as it
    is)."""
    if not spec.noise_pretrain_steps:
        return state
    return pretrain.noise_pretrain(state, jax.random.fold_in(key, 2**31), spec.noise_pretrain_steps,
                                   spec.data.batch_size, start.source.dataset.num_classes)[0]


def _train(spec: RunSpec, start: _Start, state, key, records: _Records, saved: Callable[[], None],
           progress: bool):
    """The epochs from the first not yet trained to ``spec.epochs``, each recorded and
    checkpointed (then ``saved()``); returns the final state."""
    first, resumed = start.resumed.first, start.resumed
    bar = tqdm(range(first, spec.epochs), desc="epochs", disable=not progress, initial=first,
               total=spec.epochs)
    for epoch in bar:
        epoch_start = time.perf_counter() - (resumed.elapsed if epoch == first else 0.0)
        within = {}
        if epoch == first and resumed.taken is not None:
            within["taken"] = resumed.taken
        if spec.checkpoint_every_steps:
            within["save"] = _midway_save(start, records, epoch, epoch_start, saved)
        state, steps = start.source.train_epoch(state, jax.random.fold_in(key, epoch), epoch,
                                                progress, **within)
        record = finish_epoch(start, state, steps, records, epoch, epoch_start, saved)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                        acc=f"{100 * record['train_accuracy']:.2f}%",
                        test_acc=f"{100 * record['test_accuracy']:.2f}%")
        if progress:
            tqdm.write(format_record(record, spec.epochs))
    return state


def finish_epoch(start: _Start, state, steps: dict, records: _Records, epoch: int,
                 epoch_start: float, saved: Callable[[], None]) -> dict:
    """What follows an epoch's steps: its step records, the divergence check, evaluation, the
    epoch's record and its checkpoint (then ``saved()``); returns the record."""
    steps = jax.device_get(steps)
    records.steps(epoch, steps)
    _check_finite(state, steps["loss"], epoch, start)
    record = _epoch_record(state, steps, start.source.evaluate(state), start.heldout, epoch,
                           time.perf_counter() - epoch_start)
    records.epoch(record)
    try:
        start.checkpoints.save(epoch + 1, state, records.lines, config=start.config)
    except BaseException:
        records.drop_last()  # metrics.jsonl describes exactly the checkpoints on disk
        raise
    saved()
    return record


def _summary(spec: RunSpec, start: _Start, state, key, records: _Records,
             wall_time: float) -> dict:
    """The final record, the run's facts and the closing measurements, written to
    ``summary.json`` (with ``curves.png``)."""
    record = json.loads(records.lines[-1]) if records.lines else {}
    if placement.writer():
        plots.run_curves([json.loads(line) for line in records.lines],
                         start.out / "curves.png", title=spec.title)
    summary = {**record, "wall_time": wall_time, "steps": int(state.step), "machine": machine(),
               "devices": start.where.size, "processes": jax.process_count(),
               **_closing_metrics(state, start.source.closing(), spec,
                                  jax.random.fold_in(key, spec.epochs), start.where)}
    if placement.writer():
        write_whole(start.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _per_layer(values: dict, key: str) -> str:
    return " ".join(f"{layer} {v[key]:.1f}" for layer, v in values.items())


def format_record(record: dict, epochs: int) -> str:
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
