"""A finished (or checkpointed) run, restored from its run directory alone, for measurements made
after training (``experiments.soft_alignment_attacks``):

    run = pfa_jax.app.finished.load("experiments/results/soft_alignment_seeds/bp-seed0")
    run.state, run.dataset, run.epoch

The config is the run's own ``config.json``; the state is its newest epoch checkpoint, verified
against its checksums (``pfa_jax.app.checkpoint``); the data is the run's dataset, loaded as the
run loaded it.
"""

import dataclasses
from typing import NamedTuple

import jax
from etils import epath

from pfa_jax import train
from pfa_jax.app import data, resume, sources
from pfa_jax.app.checkpoint import Checkpoints
from pfa_jax.app.placement import Placement
from pfa_jax.app.spec import RunSpec, resolve

__all__ = ["Finished", "load"]


class Finished(NamedTuple):
    spec: RunSpec
    state: train.TrainState
    dataset: data.Dataset
    epoch: int


def load(run_dir: str | epath.Path) -> Finished:
    """The run in ``run_dir`` at its newest epoch checkpoint (an error names a directory with none)."""
    run_dir = epath.Path(run_dir)
    run_spec = resolve(resume.load_config(run_dir))
    source = sources.for_spec(run_spec, Placement.create(1))
    checkpoints = Checkpoints(run_dir / "checkpoints")
    if not checkpoints.steps():
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no checkpoint to restore")
    tx = dataclasses.replace(run_spec.optimizer,
                             steps_per_epoch=source.num_train // run_spec.data.batch_size)
    like = train.create_train_state(jax.random.key(0), run_spec.model, source.sample(), tx)
    epoch = max(checkpoints.steps())
    return Finished(run_spec, checkpoints.restore(epoch, like).state, source.closing(), epoch)
