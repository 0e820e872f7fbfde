"""Checkpoints of a ``TrainState`` with orbax: one per completed epoch, the newest ``keep`` kept.

Only the arrays are written (step, params, feedback, batch_stats, opt_state and the raw data of the
RNG key); the model, optimizer and other static fields come from the state that ``restore`` is
given, which must be built from the same config (``pfa_jax.app.experiment`` does this).
"""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from pfa_jax.train import TrainState

__all__ = ["CheckpointError", "Checkpoints"]


def _arrays(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "feedback": state.feedback,
            "batch_stats": state.batch_stats, "opt_state": state.opt_state,
            "rng": jax.random.key_data(state.rng)}


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (corrupted, truncated or from another config)."""


class Checkpoints:
    """``save(epoch, state)``, ``latest()`` and ``restore(epoch, like)`` under one directory."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            pathlib.Path(directory).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep))

    def save(self, epoch: int, state: TrainState) -> None:
        """Writes the state after ``epoch`` completed epochs and waits until it is on disk."""
        self.manager.save(epoch, args=ocp.args.StandardSave(_arrays(state)))
        self.manager.wait_until_finished()

    def latest(self) -> int | None:
        """The number of completed epochs of the newest checkpoint (None if there is none)."""
        return self.manager.latest_step()

    def restore(self, epoch: int, like: TrainState) -> TrainState:
        """The state saved after ``epoch`` epochs, with the static fields of ``like``."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(like))
        try:
            arrays = self.manager.restore(epoch, args=ocp.args.StandardRestore(target))
        except Exception as error:  # noqa: BLE001 - orbax raises many kinds; all mean unreadable
            raise CheckpointError(
                f"checkpoint {self.manager.directory / str(epoch)} cannot be read "
                f"({type(error).__name__}: {error}); it is left as it is. Remove that directory "
                "to resume from an older checkpoint, or start a new run") from None
        return like.replace(**{k: v for k, v in arrays.items() if k != "rng"},
                            rng=jax.random.wrap_key_data(arrays["rng"]))
