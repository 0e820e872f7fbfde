"""Where a run starts: from nothing, or from the newest intact checkpoint of its run directory.

A run directory keeps one checkpoint per completed epoch in ``checkpoints/`` and, with
``checkpoint_every_steps``, checkpoints of a **partial epoch** in ``step-checkpoints/``
(``PARTIAL_DIR``, keyed by global step). A partial epoch is the part of an epoch trained before
such a checkpoint; the checkpoint carries it as ``partial``: the epoch, the next batch, the steps
per epoch, the per-step metrics of the steps so far and the seconds they took.

``resume`` restores the newest checkpoint of either kind that is intact, after these checks:

* the checkpoint was trained under the config of this run, except for the keys of ``RESUMABLE``
  (they change how a run is measured or placed, not what it trains); every other changed key is
  named;
* ``epochs`` is at least what the checkpoint has trained;
* ``metrics.jsonl`` holds at least one record per checkpointed epoch, each line the one the run
  wrote (the checkpoint carries their checksums);
* a partial epoch's steps per epoch are this config's.

Damaged checkpoints newer than the one restored are named in ``Start.damaged``; ``set_aside``
moves them to ``damaged-checkpoints/``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import sys

import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from pfa_jax import train
from pfa_jax.app import config as config_lib
from pfa_jax.app import placement, rundir
from pfa_jax.app.checkpoint import CheckpointDamagedError, CheckpointMismatchError, Checkpoints, crc32

__all__ = ["changes", "found", "load_config", "PARTIAL_DIR", "RESUMABLE", "resume", "set_aside", "Start",
           "when"]

PARTIAL_DIR = "step-checkpoints"  # the partial-epoch checkpoints of a run directory

# the keys a resume may change (they do not change what is trained), and the sections ("x.")
RESUMABLE = ("epochs", "devices", "data_dir", "data_processes", "eval_batch_size",
             "metrics_batch_size", "log_every_steps", "checkpoint_every_steps", "sharpness.",
             "robustness.")


@dataclasses.dataclass
class Start:
    """Where a run starts: ``first`` completed epochs, the ``state``, the ``metrics.jsonl`` lines
    ``kept``; from a partial-epoch checkpoint the per-step metrics of epoch ``first`` so far
    (``partial``) and the seconds they took (``elapsed``). ``damaged``: the errors of the damaged
    checkpoints skipped, and ``newer``: those checkpoints (``(Checkpoints, key, name)``), all
    newer than the one restored; ``when``: the checkpoint restored, in words (``when``)."""

    first: int
    state: train.TrainState
    kept: list[str] = dataclasses.field(default_factory=list)
    partial: dict | None = None
    elapsed: float = 0.0
    damaged: list[str] = dataclasses.field(default_factory=list)
    newer: list = dataclasses.field(default_factory=list)
    when: str = ""

    def begun(self, now: float) -> float:
        """The run's starting time on the clock of ``now``: the recorded epoch times of the
        restored epochs and the partial epoch's elapsed time before ``now``."""
        return now - self.elapsed - sum(json.loads(line)["epoch_time"] for line in self.kept)


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


def changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
    """``'key: saved -> new'`` for every key in which ``config`` differs from ``saved``."""
    old, new = (traverse_util.flatten_dict(c.to_dict(), sep=".") for c in (saved, config))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def when(position: int, steps_per_epoch: int) -> str:
    """A checkpoint's global step in words: ``'after epoch 2'`` or ``'at step 5 of epoch 3'``."""
    epochs, steps = divmod(position, steps_per_epoch)
    return f"at step {steps} of epoch {epochs + 1}" if steps else f"after epoch {epochs}"


def found(checkpoints: Checkpoints, partials: Checkpoints | None, steps_per_epoch: int) -> list:
    """Every checkpoint as ``(global step, its Checkpoints, key, name)``, newest first."""
    every = [(e * steps_per_epoch, checkpoints, e, str(e)) for e in checkpoints.steps()]
    every += [(g, partials, g, f"step-{g}") for g in (partials.steps() if partials else [])]
    return sorted(every, key=lambda f: f[0], reverse=True)


def resume(out: epath.Path, checkpoints: Checkpoints, partials: Checkpoints | None, spec, like,
           steps_per_epoch: int) -> Start:
    """The newest intact checkpoint, epoch-end or partial-epoch, restored after the module's
    checks; an intact checkpoint of another state (the config changed) or none intact raises,
    naming them."""
    every = found(checkpoints, partials, steps_per_epoch)
    if not every:
        raise FileNotFoundError(f"no checkpoint in {out / 'checkpoints'} to resume from")
    if every[0][0] > spec.epochs * steps_per_epoch:
        raise ValueError(f"epochs={spec.epochs} is fewer than the "
                         f"{_progress(every[0][0], steps_per_epoch)} already checkpointed")
    damaged = []
    for number, (position, holder, key, _) in enumerate(every):
        try:
            restored = holder.restore(key, like)
        except CheckpointDamagedError as error:
            damaged.append(str(error))
            continue
        except CheckpointMismatchError as error:
            saved, what = _trained_under(out, error.config)
            raise CheckpointMismatchError(
                f"{error}. The config differs from {what} in "
                f"{', '.join(changes(saved, spec.config)) or 'none'}: resume with the run's own "
                "config (another rule, model or optimizer needs a new run, another --out); the "
                "checkpoints are intact and left as they are") from None
        partial, elapsed = (None, 0.0) if restored.partial is None else _partial(
            restored.partial, holder.path(key), steps_per_epoch)
        _check_resumable(out, restored.config, spec.config, when(position, steps_per_epoch))
        done = position // steps_per_epoch
        return Start(done, restored.state,
                     _metrics_lines(out / "metrics.jsonl", done, restored.records), partial,
                     elapsed, damaged, [f[1:] for f in every[:number]],
                     when(position, steps_per_epoch))
    raise CheckpointDamagedError(
        f"no intact checkpoint in {out / 'checkpoints'} to resume from: " + "; ".join(damaged)
        + ". They are left as they are; start a new run (--overwrite or another --out)")


def set_aside(out: epath.Path, start: Start, directory: rundir.RunDirectory) -> None:
    """Moves the checkpoints newer than the one restored (the damaged ones) to
    ``out/damaged-checkpoints``, saying so on stderr; the resumed run writes its own checkpoints
    of those steps. Process 0 moves them once every process has read the directory."""
    placement.barrier("pfa_jax: checkpoints read")
    for holder, key, name in start.newer if placement.writer() else ():
        (out / "damaged-checkpoints").mkdir(exist_ok=True)
        target = out / "damaged-checkpoints" / name
        for copy in itertools.count(2):
            if not target.exists():
                break
            target = out / "damaged-checkpoints" / f"{name}.{copy}"
        directory.rename(holder.path(key), target)
    placement.barrier("pfa_jax: damaged checkpoints set aside")
    for holder in {id(h): h for h, _, _ in start.newer}.values():
        holder.reload()
    for error in start.damaged if placement.writer() else ():
        print(f"pfa-jax: warning: {error}; moved to {out / 'damaged-checkpoints'}. Resuming "
              f"from the checkpoint {start.when}, the newest intact one", file=sys.stderr)


def _progress(position: int, steps_per_epoch: int) -> str:
    """A global step in words: ``'2 epochs'`` or ``'2 epochs and 5 steps'``."""
    epochs, steps = divmod(position, steps_per_epoch)
    return f"{epochs} epochs" + (f" and {steps} steps" if steps else "")


def _partial(partial: dict, path: epath.Path, steps_per_epoch: int) -> tuple[dict, float]:
    """The per-step metrics and elapsed time of a partial-epoch checkpoint, once its steps per
    epoch are checked to be this config's."""
    saved = int(partial["steps_per_epoch"])
    if saved != steps_per_epoch:
        raise ValueError(f"checkpoint {path} was written mid-epoch with {saved} steps per epoch; "
                         f"this config gives {steps_per_epoch} (batch_size or limit changed): "
                         "resume with the run's own config")
    return partial["steps"], float(partial["elapsed"])


def _trained_under(out: epath.Path, text: str | None) -> tuple[ml_collections.ConfigDict, str]:
    """The config a checkpoint was trained under (``text``, saved with it) and what it is, or,
    for a checkpoint saved without one, the run's ``config.json``."""
    if text is None:
        return load_config(out), f"the run's {out / 'config.json'}"
    return config_lib.from_json(text), "the config the checkpoint was trained under"


def _check_resumable(out: epath.Path, text: str | None, config, at: str) -> None:
    """Refuses a resume whose config changes a key outside ``RESUMABLE`` from the one the
    checkpoint was trained under, naming every such key."""
    if text is None:
        return
    changed = [c for c in changes(config_lib.from_json(text), config)
               if not c.startswith(RESUMABLE)]
    if changed:
        raise ValueError(
            f"the checkpoint {at} in {out} was trained under another config: "
            f"{'; '.join(changed)} (config.json edited, or --set). A resume may change only "
            f"{', '.join(k.replace('.', '.*') for k in RESUMABLE)}; another rule, model, "
            "optimizer or data needs a new run (another --out, or --overwrite). Nothing was "
            "changed")


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
