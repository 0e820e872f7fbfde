"""One training run from a run spec (``pfa_jax.app.spec``): ``train_and_evaluate(spec, workdir)``
prepares the run, trains the epochs, each recorded and checkpointed, and writes the summary.

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON record per
epoch: train / test loss and accuracy, learning rate, weight decay, per-layer alignment, per-layer
gradient alignment on the first ``metrics_batch_size`` test examples, epoch time), ``checkpoints/``
(orbax, after every epoch, the newest two kept), ``curves.png`` (accuracy and alignment against the
epoch, ``pfa_jax.app.plots``), ``tensorboard/`` (``pfa_jax.app.events``) and ``summary.json`` (the
final record, ``wall_time``, ``machine`` and, when the config asks, ``sharpness``, ``adversarial``
and ``noise``: ``pfa_jax.app.closing``). The records go through ``pfa_jax.app.writers``; where a run
starts, and resuming, is ``pfa_jax.app.resume``; the lock and rollback of the directory are
``pfa_jax.app.rundir``. ``wall_time`` is the time from the first epoch to the last one's checkpoint
(the closing measurements not included); a resumed run counts the recorded epoch times of the epochs
it restored, not the time lost to the interruption and the restart. ``machine`` names the hardware
of the process that finished the run. With ``noise_pretrain_steps`` the fresh state is first trained
on noise (``pfa_jax.app.pretrain``).

``resume=True`` continues a run directory from its newest checkpoint (``pfa_jax.app.resume``) to
``epochs``. Every epoch's data order and noise come from ``(seed, epoch)`` and the state carries its
own key, so a resumed run ends with the same metrics as one never interrupted.

Data parallel (``pfa_jax.app.placement``): the run trains on ``devices`` devices (0: every device
of every process), the state replicated and every batch split over them, evaluation and the
measurements too. With several processes every process runs the same program on its own part of
each batch; only process 0 writes the files but the checkpoints, which orbax writes from all of
them (the run directory must be one file system that every process sees).

Streamed datasets (``pfa_jax.app.streaming``: ``imagenet2012``) do not fit in memory: their epochs
are a Python loop of one jitted step per prefetched batch (``pfa_jax.app.sources``), with the same
records, checkpoints, resume and divergence guard, and with ``checkpoint_every_steps = n`` a
checkpoint of the partial epoch every ``n`` global steps (``pfa_jax.app.resume``), written only if
the epoch's losses so far and the parameters are finite. ``augment`` must be ``'none'`` (the
training batches always get the standard random-resized crop and flip); ``image_size`` (0 or
absent: 224) sets the crop size. The fixed-batch and closing measurements use the first examples
of a split, centre-cropped as for evaluation and held in memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from pfa_jax import metrics, train
from pfa_jax import nn as pnn
from pfa_jax.app import closing, data, placement, plots, pretrain, rundir, sources, streaming
from pfa_jax.app import resume as resume_lib  # train_and_evaluate's resume= is the flag
from pfa_jax.app.checkpoint import Checkpoints
from pfa_jax.app.spec import RunSpec
from pfa_jax.app.writers import Writers, write_whole

__all__ = ["check_fits", "DivergenceError", "finish_epoch", "prepare", "pretrained", "Run",
           "train_and_evaluate", "write_summary"]


def train_and_evaluate(spec: RunSpec, workdir: str | epath.Path, overwrite: bool = False,
                       progress: bool = True, resume: bool = False) -> dict:
    """Trains the run ``spec`` (``pfa_jax.app.spec.resolve``) and writes the run directory
    ``workdir`` (``resume``: continues it from its newest checkpoint); returns the summary. The
    directory is locked for the run and left as it was if the run fails before its first
    checkpoint (``pfa_jax.app.rundir``). A resume with no epoch left to train returns the run's
    summary as it is and writes nothing."""
    init_key, key = jax.random.split(jax.random.key(spec.seed))
    with rundir.RunDirectory(workdir, writer=placement.writer()) as directory:
        run = prepare(spec, directory, overwrite, resume, init_key)
        if resume and run.start.first == spec.epochs and (run.out / "summary.json").exists():
            return json.loads((run.out / "summary.json").read_text())
        state = run.start.state if resume else pretrained(spec, run, run.start.state, key)
        begun = run.start.begun(time.perf_counter())
        writers = run.writers(spec, console=progress and placement.writer())
        with contextlib.closing(writers):
            for epoch in range(run.start.first, spec.epochs):
                state = _epoch(spec, run, state, key, writers, epoch, directory.commit, progress)
        summary = write_summary(spec, run, state, key, writers.lines, time.perf_counter() - begun)
        directory.commit()
        return summary


class DivergenceError(RuntimeError):
    """The training loss or the parameters became non-finite. ``diagnosis``: what diverged and
    where (epoch, step), without the machine's paths; the message adds the checkpoint kept and
    what to do."""

    def __init__(self, diagnosis: str, advice: str):
        super().__init__(f"{diagnosis}. {advice}")
        self.diagnosis = diagnosis


@dataclasses.dataclass
class Run:
    """What a run trains with (``prepare``): the devices, the data source, the held-out batch of
    the gradient alignment, the run directory ``out`` and its checkpoints (one per completed
    epoch; ``partials``: the partial-epoch ones), the steps per epoch, where it starts, and the
    resolved config's text, saved with every checkpoint."""

    where: placement.Placement
    source: sources.InMemory | sources.Streamed
    heldout: dict | None
    out: epath.Path
    checkpoints: Checkpoints
    partials: Checkpoints | None
    steps_per_epoch: int
    start: resume_lib.Start
    config: str

    def writers(self, spec: RunSpec, console: bool) -> Writers:
        return Writers(self.out, self.start.kept, self.steps_per_epoch, self.start.first,
                       spec.log_every_steps, spec.epochs, console)


def prepare(spec: RunSpec, directory: rundir.RunDirectory, overwrite: bool, resuming: bool,
            init_key) -> Run:
    """The devices, the data source, the held-out batch, the run directory, its checkpoints and
    where the run starts (restored from the newest checkpoint when ``resuming``). Everything is
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
    heldout = closing.batches(*source.heldout(size), size, size, where)[0] if size else None
    state = where.whole(train.create_train_state(init_key, spec.model, source.sample(), tx,
                                                 loss=spec.loss))
    out = directory.out
    if not resuming:
        _claim(directory, overwrite)
    directory.begin()
    checkpoints = Checkpoints(out / "checkpoints")
    partials = (Checkpoints(out / resume_lib.PARTIAL_DIR)
                if spec.checkpoint_every_steps or (out / resume_lib.PARTIAL_DIR).exists() else None)
    if resuming:
        start = resume_lib.resume(out, checkpoints, partials, spec, state, steps_per_epoch)
        if start.damaged:
            resume_lib.set_aside(out, start, directory)
    else:
        start = resume_lib.Start(0, state)
    placement.barrier("pfa_jax: run directory read")  # before process 0 writes into it
    if placement.writer():
        write_whole(out / "config.json", spec.config.to_json(indent=2) + "\n")
    return Run(where, source, heldout, out, checkpoints, partials, steps_per_epoch, start,
               spec.config.to_json(indent=2))


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


def pretrained(spec: RunSpec, run: Run, state, key):
    """A new run's state after its noise pretraining (``spec.noise_pretrain_steps``; none: as it
    is)."""
    if not spec.noise_pretrain_steps:
        return state
    return pretrain.noise_pretrain(state, jax.random.fold_in(key, 2**31), spec.noise_pretrain_steps,
                                   spec.data.batch_size, run.source.dataset.num_classes)[0]


def _epoch(spec: RunSpec, run: Run, state, key, writers: Writers, epoch: int,
           saved: Callable[[], None], progress: bool):
    """Epoch ``epoch`` trained (from a resumed partial epoch where there is one), recorded and
    checkpointed (then ``saved()``); returns the state."""
    resumed = epoch == run.start.first
    epoch_start = time.perf_counter() - (run.start.elapsed if resumed else 0.0)
    partial = {}
    if resumed and run.start.partial is not None:
        partial["partial_steps"] = run.start.partial
    if spec.checkpoint_every_steps:
        partial["save_partial"] = _partial_saver(run, writers, epoch, epoch_start, saved)
    state, steps = run.source.train_epoch(state, jax.random.fold_in(key, epoch), epoch,
                                          progress and placement.writer(), **partial)
    finish_epoch(run, state, steps, writers, epoch, epoch_start, saved)
    return state


def finish_epoch(run: Run, state, steps: dict, writers: Writers, epoch: int, epoch_start: float,
                 saved: Callable[[], None]) -> dict:
    """What follows an epoch's steps: its step records, the divergence check, evaluation, the
    epoch's record and its checkpoint (then ``saved()``); returns the record. A checkpoint that
    fails takes its record back, so ``metrics.jsonl`` describes exactly the checkpoints on disk."""
    steps = jax.device_get(steps)
    writers.write_steps(epoch, steps)
    _check_finite(run, state, steps["loss"], epoch)
    record = _epoch_record(state, steps, run.source.evaluate(state), run.heldout, epoch,
                           time.perf_counter() - epoch_start)
    writers.write_epoch(record)
    try:
        run.checkpoints.save(epoch + 1, state, writers.lines, config=run.config)
    except BaseException:
        writers.drop_last()
        raise
    saved()
    return record


def _partial_saver(run: Run, writers: Writers, epoch: int, epoch_start: float,
                   saved: Callable[[], None]):
    """``save_partial(state, steps)`` for ``Streamed.train_epoch``: a partial-epoch checkpoint at
    the global step after the epoch's ``steps`` so far, once their losses and the parameters are
    finite; then ``saved()``."""
    def save_partial(state, steps: dict) -> None:
        done = len(steps["loss"])
        _check_finite(run, state, steps["loss"], epoch)
        partial = {"steps": steps, "epoch": epoch, "next_batch": done,
                   "steps_per_epoch": run.steps_per_epoch,
                   "elapsed": time.perf_counter() - epoch_start}
        run.partials.save(epoch * run.steps_per_epoch + done, state, writers.lines, partial,
                          run.config)
        saved()
    return save_partial


def _check_finite(run: Run, state, losses, epoch: int) -> None:
    """Raises ``DivergenceError`` naming the epoch (1-based) and step of the first non-finite loss
    (``losses``: the epoch's so far), or the epoch whose parameters are non-finite, and the newest
    checkpoint, which stays as it is with the older ones."""
    finite = np.isfinite(losses)
    params_finite = all(bool(np.all(np.isfinite(p))) for p in jax.tree.leaves(state.params))
    if finite.all() and params_finite:
        return
    where = (f"step {int(np.argmin(finite)) + 1}" if not finite.all()
             else f"step {len(losses)} (the parameters)")
    found = resume_lib.found(run.checkpoints, run.partials, run.steps_per_epoch)
    kept = (f"The last good checkpoint ({resume_lib.when(found[0][0], run.steps_per_epoch)}) is kept "
            f"in {found[0][1].directory}; lower the learning rate and start again (--overwrite "
            "keeps this run until the new one checkpoints)") if found else (
        "No epoch completed, so no checkpoint was written; lower the learning rate and start "
        "again (--overwrite)")
    raise DivergenceError(f"training diverged in epoch {epoch + 1} at {where}: non-finite values",
                          kept)


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


def _floats(tree):
    return jax.tree.map(lambda x: float(x), jax.device_get(tree))


def write_summary(spec: RunSpec, run: Run, state, key, lines: list[str], wall_time: float) -> dict:
    """The final record, the run's facts and the closing measurements, written to
    ``summary.json`` (with ``curves.png``); returned."""
    record = json.loads(lines[-1]) if lines else {}
    if placement.writer():
        plots.run_curves([json.loads(line) for line in lines], run.out / "curves.png",
                         title=spec.title)
    summary = {**record, "wall_time": wall_time, "steps": int(state.step),
               "machine": closing.machine(), "devices": run.where.size,
               "processes": jax.process_count(),
               **closing.measure(state, run.source.closing(), spec,
                                 jax.random.fold_in(key, spec.epochs), run.where)}
    if placement.writer():
        write_whole(run.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
