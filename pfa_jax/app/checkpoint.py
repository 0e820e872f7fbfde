"""Checkpoints of a ``TrainState`` with orbax: one per completed epoch, the newest ``keep`` kept.

Only the arrays are written (step, params, feedback, batch_stats, opt_state and the raw data of the
RNG key); the model, optimizer and other static fields come from the state that ``restore`` is
given, which must be built from the same config (``pfa_jax.app.experiment`` does this).

Checkpoints written before the optimizer state took its present layout (one
``optax.multi_transform`` over ``{'params', 'feedback', 'frozen'}`` labels, every group's state over
the whole ``{'params', 'feedback'}`` tree) are migrated on restore (``migrate_opt_state``): the same
transformation's state, moved into today's ``{'params': ..., 'feedback': ...}`` layout, so a run
directory of that time resumes exactly.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from pfa_jax.train import TrainState

__all__ = ["CheckpointError", "Checkpoints", "migrate_opt_state"]


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
            arrays = self._restore_old_layout(epoch, like)
            if arrays is not None:
                return _with_arrays(like, arrays)
            raise CheckpointError(
                f"checkpoint {self.manager.directory / str(epoch)} cannot be read "
                f"({type(error).__name__}: {error}); it is left as it is. Remove that directory "
                "to resume from an older checkpoint, or start a new run") from None
        return _with_arrays(like, arrays)

    def _restore_old_layout(self, epoch: int, like: TrainState) -> dict | None:
        """The arrays of a checkpoint with the old optimizer-state layout, migrated; None if the
        checkpoint is not one (or cannot be read at all)."""
        try:
            raw = self.manager.restore(epoch, args=ocp.args.StandardRestore())
            if "inner_states" not in raw["opt_state"]:
                return None
            arrays = {**raw, "opt_state": migrate_opt_state(raw["opt_state"], like.opt_state)}
            want = _arrays(like)
            same = jax.tree.map(lambda a, b: jnp.shape(a) == jnp.shape(b), want, arrays)
            return arrays if all(jax.tree.leaves(same)) else None
        except Exception:  # noqa: BLE001 - any failure: not a readable checkpoint of the old layout
            return None


def _with_arrays(like: TrainState, arrays: dict) -> TrainState:
    arrays = jax.tree.map(jnp.array, arrays)  # copies: a migrated count may fill several leaves
    return like.replace(**{k: v for k, v in arrays.items() if k != "rng"},
                        rng=jax.random.wrap_key_data(arrays["rng"]))


def migrate_opt_state(old: dict, like):
    """An optimizer state saved in the old layout (``old``: ``{'inner_states': {group:
    {'inner_state': chain}}}``, each chain's array fields over ``{'params', 'feedback'}``) in the
    layout of ``like`` (``{group: inject_hyperparams state}``): the chain's fields of group ``g``
    from the ``g`` part of the old trees, the step counts (of the injection and of its schedules)
    from the old schedule's count; the injected values are recomputed from them at the next step."""
    def pick(path, leaf):
        group, *rest = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
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
