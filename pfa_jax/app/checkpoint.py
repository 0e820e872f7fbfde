"""Checkpoints of a ``TrainState`` with orbax, the newest ``keep`` kept, each carrying checksums that
restore verifies. ``pfa_jax.app.experiment`` keeps one per completed epoch (keyed by the epoch) and,
for streamed data, partial-epoch ones (keyed by the global step) in a second directory.

Only the arrays are written (step, params, feedback, batch_stats, opt_state and the raw data of the
RNG key); the model, optimizer and other static fields come from the state that ``restore`` is
given, which must be built from the same config (``pfa_jax.app.experiment`` does this). Beside them,
in the same atomic orbax checkpoint, ``integrity``: the CRC-32 of every array's bytes (in
``jax.tree.leaves`` order) and of every line of the run's metrics so far (``save``'s ``records``);
and for a partial-epoch checkpoint ``within_epoch`` (``save``'s ``partial``, checksummed with
the arrays): where in the epoch the run stands and the per-step metrics of the epoch's steps so
far.

``restore`` tells three failures apart, each a ``CheckpointError`` naming the checkpoint:

* ``CheckpointMismatchError``: the checkpoint is intact but holds another state than ``like``
  (another rule, model or optimizer): the config differs from the run's; nothing is wrong with the
  files.
* ``CheckpointDamagedError``: it cannot be read (truncated, missing files) or an array differs from
  its checksum (bytes garbled on disk). An older checkpoint may still be intact
  (``pfa_jax.app.experiment`` then resumes from it).

Checkpoints written before the checksums existed restore unverified. Checkpoints written before the
optimizer state took its present layout (one ``optax.multi_transform`` over ``{'params',
'feedback', 'frozen'}`` labels, every group's state over the whole ``{'params', 'feedback'}`` tree)
are migrated on restore (``migrate_opt_state``): the same transformation's state, moved into
today's ``{'params': ..., 'feedback': ...}`` layout, so a run directory of that time resumes exactly.
"""

import gc
import logging
import sys
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pfa_jax.train import TrainState

__all__ = ["CheckpointDamagedError", "CheckpointError", "CheckpointMismatchError", "Checkpoints",
           "crc32", "migrate_opt_state", "Restored"]

INTEGRITY = "integrity"
PARTIAL = "within_epoch"  # the partial epoch's name inside a checkpoint (kept for old ones)


class Restored(NamedTuple):
    """A restored checkpoint: the state, the CRC-32s of the metrics lines saved with it (None: a
    checkpoint from before the checksums), its ``partial`` epoch (None: saved at an epoch's end)
    and the config it was trained under (``save``'s ``config``; None: saved without one)."""

    state: TrainState
    records: np.ndarray | None
    partial: dict | None
    config: str | None = None


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into the given state."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint's files cannot be read, or its arrays differ from their checksums."""


class CheckpointMismatchError(CheckpointError):
    """An intact checkpoint holds another state (other arrays or shapes) than the one asked for;
    ``config``: the config it was trained under, where it was saved with one."""

    def __init__(self, message: str, config: str | None = None):
        super().__init__(message)
        self.config = config


def crc32(data) -> int:
    """The CRC-32 of an array's bytes (C order) or of a string's UTF-8 bytes."""
    raw = data.encode() if isinstance(data, str) else np.ascontiguousarray(np.asarray(data)).tobytes()
    return zlib.crc32(raw)


def _arrays(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "feedback": state.feedback,
            "batch_stats": state.batch_stats, "opt_state": state.opt_state,
            "rng": jax.random.key_data(state.rng)}


def _checksums(arrays: dict) -> np.ndarray:
    return np.array([crc32(leaf) for leaf in jax.tree.leaves(arrays)], np.uint32)


def _keys(path) -> list:
    """The steps of a tree path as plain keys, whether they are dict keys, attributes (named
    tuples) or indices: orbax's metadata tree has dicts where the state has named tuples."""
    return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]


def _name(path) -> str:
    """A tree path as ``'opt_state/params/0/mu'`` (``_keys``)."""
    return "/".join(map(str, _keys(path)))


def _shapes(tree) -> dict:
    """``{path: (shape, dtype)}`` of every array (or array metadata) in ``tree``."""
    return {_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _differences(saved: dict, wanted: dict) -> str:
    """The first few paths whose arrays one tree has and the other has not, or of other shapes."""
    lines = [f"{p} only in the checkpoint" for p in saved if p not in wanted]
    lines += [f"{p} missing from the checkpoint" for p in wanted if p not in saved]
    lines += [f"{p}: {saved[p][0]} {saved[p][1]} saved, {wanted[p][0]} {wanted[p][1]} wanted"
              for p in saved if p in wanted and saved[p] != wanted[p]]
    more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
    return "; ".join(lines[:3]) + more


def _unreadable(path: epath.Path, error: Exception) -> CheckpointDamagedError:
    """The error for an unreadable checkpoint: the storage library's message cut to its first
    line, without the storage spec it appends."""
    message = str(error).splitlines()[0] if str(error) else ""
    message = message.split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
    message = message if len(message) <= 300 else message[:300] + " ..."
    return CheckpointDamagedError(f"checkpoint {path} cannot be read ({type(error).__name__}: "
                                  f"{message})")


class _Quiet:
    """Silences orbax's and absl's error logging and the "Exception ignored in" dumps of orbax's
    abandoned read coroutines (collected before leaving), so a restore failure is reported by the
    raised error, in one line, instead of the storage library's dump."""

    def __enter__(self):
        self.levels = {name: logging.getLogger(name).level for name in ("absl", "orbax")}
        for name in self.levels:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.hook = sys.unraisablehook
        sys.unraisablehook = self._unless_orbax

    def _unless_orbax(self, unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if code is None or "orbax" not in code.co_filename:
            self.hook(unraisable)

    def __exit__(self, kind, error, traceback):
        if kind is not None:
            gc.collect()  # the coroutines of a failed read, while their dumps are silenced
        sys.unraisablehook = self.hook
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


class Checkpoints:
    """``save(key, state, records, partial)``, ``steps()`` and ``restore(key, like)`` under one
    directory (the keys: completed epochs, or global steps)."""

    def __init__(self, directory: str | epath.Path, keep: int = 2):
        directory = epath.Path(directory)
        self.directory = directory if "://" in str(directory) else directory.absolute()
        with _Quiet():  # a damaged checkpoint's metadata is logged here; restore reports it
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep),
                item_handlers=ocp.StandardCheckpointHandler())

    def save(self, key: int, state: TrainState, records: Sequence[str] = (),
             partial: dict | None = None, config: str | None = None) -> None:
        """Writes the state as checkpoint ``key`` with its checksums and those of the metrics
        lines ``records`` (and ``partial``, a tree of arrays, for a partial-epoch checkpoint; and
        ``config``, the text of the config the state was trained under, which ``restore``
        returns), and waits until it is on disk."""
        arrays = _arrays(state)
        if partial is not None:
            arrays[PARTIAL] = jax.tree.map(np.asarray, partial)
        integrity = {"arrays": _checksums(arrays)}
        if records:  # none before the first epoch ends (orbax saves no empty arrays)
            integrity["records"] = np.array([crc32(line) for line in records], np.uint32)
        if config:
            integrity["config"] = np.frombuffer(config.encode(), np.uint8)
        try:
            with _Quiet():
                self.manager.save(key, args=ocp.args.StandardSave({**arrays, INTEGRITY: integrity}))
                self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - a full disk, a lost mount: one clear line
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"checkpoint {self.path(key)} could not be written "
                                  f"({type(error).__name__}: {message[:300]})") from error

    def steps(self) -> list[int]:
        """The keys of every checkpoint, newest first."""
        with _Quiet():
            return sorted(self.manager.all_steps(), reverse=True)

    def path(self, epoch: int) -> epath.Path:
        return self.directory / str(epoch)

    def reload(self) -> None:
        """Reads the directory again (after checkpoints were moved out of it)."""
        with _Quiet():
            self.manager.reload()

    def _metadata(self, epoch: int) -> dict:
        try:
            with _Quiet():
                return dict(self.manager.item_metadata(epoch).tree)
        except Exception as error:  # noqa: BLE001 - orbax raises many kinds; all mean unreadable
            raise _unreadable(self.path(epoch), error) from None

    def _read(self, epoch: int, target: dict | None) -> dict:
        """The arrays of checkpoint ``epoch`` (``target``: their shapes and shardings; None: as
        saved)."""
        try:
            with _Quiet():
                return dict(self.manager.restore(epoch, args=ocp.args.StandardRestore(target)))
        except Exception as error:  # noqa: BLE001 - orbax raises many kinds; all mean unreadable
            raise _unreadable(self.path(epoch), error) from None

    def restore(self, epoch: int, like: TrainState) -> Restored:
        """Checkpoint ``epoch``: its state, with the static fields of ``like``, its arrays
        verified against their checksums (module docstring for the errors); the CRC-32s of the
        metrics lines saved with it; its ``partial`` epoch."""
        metadata = self._metadata(epoch)
        wanted = _arrays(like)
        saved = {k: v for k, v in metadata.items() if k not in (INTEGRITY, PARTIAL)}
        saved_shapes, wanted_shapes = _shapes(saved), _shapes(wanted)
        if saved_shapes != wanted_shapes:
            if "inner_states" in saved.get("opt_state", {}):
                return Restored(_with_arrays(like, self._migrate(epoch, like)), None, None)
            raise CheckpointMismatchError(
                f"checkpoint {self.path(epoch)} is intact but holds another state than this config "
                f"builds ({_differences(saved_shapes, wanted_shapes)})",
                self._saved_config(epoch))
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, wanted)
        for extra in (INTEGRITY, PARTIAL):
            if extra in metadata:
                target[extra] = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata[extra])
        arrays = self._read(epoch, target)
        if INTEGRITY not in arrays:
            return Restored(_with_arrays(like, arrays), None, None)
        integrity = arrays.pop(INTEGRITY)
        saved_crcs, crcs = np.asarray(integrity["arrays"]), _checksums(arrays)
        paths = [_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(arrays)[0]]
        damaged = [path for path, a, b in zip(paths, saved_crcs, crcs) if a != b]
        if damaged or len(saved_crcs) != len(crcs):
            raise CheckpointDamagedError(
                f"checkpoint {self.path(epoch)} is damaged: {len(damaged)} array(s) differ from "
                f"their checksums ({', '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''})")
        partial = arrays.pop(PARTIAL, None)
        return Restored(_with_arrays(like, arrays),
                        np.asarray(integrity.get("records", np.zeros(0, np.uint32))),
                        None if partial is None else jax.tree.map(np.asarray, partial),
                        _config_text(integrity))

    def _saved_config(self, epoch: int) -> str | None:
        """The config checkpoint ``epoch`` was saved with (read as saved), or None."""
        try:
            return _config_text(self._read(epoch, None).get(INTEGRITY, {}))
        except CheckpointDamagedError:
            return None

    def _migrate(self, epoch: int, like: TrainState) -> dict:
        """The arrays of a checkpoint with the old optimizer-state layout, migrated."""
        raw = self._read(epoch, None)
        arrays = {**raw, "opt_state": migrate_opt_state(raw["opt_state"], like.opt_state)}
        migrated, wanted = _shapes(arrays), _shapes(_arrays(like))
        if migrated != wanted:
            raise CheckpointMismatchError(
                f"checkpoint {self.path(epoch)} (old optimizer layout) holds another state than "
                f"this config builds ({_differences(migrated, wanted)})")
        return arrays


def _config_text(integrity: dict) -> str | None:
    """The config text a checkpoint's ``integrity`` holds, or None."""
    raw = integrity.get("config")
    return None if raw is None else np.asarray(raw, np.uint8).tobytes().decode()


def _with_arrays(like: TrainState, arrays: dict) -> TrainState:
    """``like`` holding ``arrays``, each copied (a migrated count may fill several leaves) and
    placed as ``like``'s array of its place (e.g. replicated on the run's devices)."""
    leaves, tree = jax.tree.flatten(arrays)
    placed = [jax.device_put(np.array(leaf), target.sharding)
              for leaf, target in zip(leaves, jax.tree.leaves(_arrays(like)))]
    arrays = jax.tree.unflatten(tree, placed)
    return like.replace(**{k: v for k, v in arrays.items() if k != "rng"},
                        rng=jax.random.wrap_key_data(arrays["rng"]))


def migrate_opt_state(old: dict, like):
    """An optimizer state saved in the old layout (``old``: ``{'inner_states': {group:
    {'inner_state': chain}}}``, each chain's array fields over ``{'params', 'feedback'}``) in the
    layout of ``like`` (``{group: inject_hyperparams state}``): the chain's fields of group ``g``
    from the ``g`` part of the old trees, the step counts (of the injection and of its schedules)
    from the old schedule's count; the injected values are recomputed from them at the next step."""
    def pick(path, leaf):
        group, *rest = _keys(path)
        chain = old["inner_states"][group]["inner_state"]
        if rest[-1] == "count" and rest[0] in ("count", "hyperparams_states"):
            return chain[-1]["count"]  # the step count, also of each wrapped schedule
        if rest[0] == "hyperparams":
            return leaf
        _, index, field, *tree = rest  # 'inner_state', element, field, path in the group's tree
        node = chain[index][field]
        for key in ([group, *tree] if tree else []):
            node = node[key]
        return node

    return jax.tree_util.tree_map_with_path(pick, like)
