"""Runs that differ only in their seed and the optimizer's scalars, trained as one population
(``pfa_jax.population``) and written as their single runs write them.

Each member gets its own run directory, locked and prepared exactly as
``experiment.train_and_evaluate`` prepares a new run (``config.json``, the same initial state from
its seed); then every epoch is one
``pfa_jax.population.train_epoch`` of all members, each with its single run's epoch key
``fold_in(key, epoch)``, and each member's epoch is finished as a single run finishes it
(``experiment.finish_epoch``: its records through ``pfa_jax.app.writers``, evaluation, its
checkpoint), and its ``summary.json`` written as a single run's. A member whose training diverges
is closed as a single run that diverged is (its directory as the failed run leaves it) and
reported, while the others go on. Only ``epoch_time`` and ``wall_time`` differ from the single
runs: the members share the population's epochs.

Which runs can be members (``refusal``): new runs (a partial one resumes as a single run), on one
device of one process, with in-memory data and no mid-epoch checkpoints. Members share everything
but (``group``) their ``seed``, the rule's init-only options (``pfa_jax.rules.Rule.init_only``: the
soft alignment ``rho``; a rule given per layer is grouped by the rest) and the optimizer's scalars
``SCALARS`` (learning rate and its decay, weight decay, momentum, Adam's ``b1``, ``b2``, ``eps``):
the model, the rest of the rule, the data, the optimizer's name and milestones are one program.
Members with another learning rate or weight decay are built by ``pfa_jax.optim.scheduled`` with
their own values as traced scalars, so each steps as its single run does. With
``optimizer.feedback`` set (plastic feedback stepped by an optimizer of its own, derived from the
main one) the optimizer's scalars may not differ.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence

import jax
from etils import epath
from flax import traverse_util

from pfa_jax import optim, population, rules
from pfa_jax.app import experiment, placement, resume, rundir
from pfa_jax.app.spec import RunSpec
from pfa_jax.app.writers import Writers

__all__ = ["group", "refusal", "run", "SCALARS"]

SCALARS = ("learning_rate", "lr_decay", "weight_decay", "momentum", "b1", "b2", "eps")


def _free(spec: RunSpec) -> tuple[str, ...]:
    """The config keys in which members of one population may differ."""
    rule = spec.rule if isinstance(spec.rule, rules.Rule) else None
    init_only = tuple(f"rule.options.{name}" for name in (rule.init_only if rule else ()))
    if spec.config.optimizer.get("feedback"):
        return ("seed", *init_only)
    return ("seed", *init_only, *(f"optimizer.{name}" for name in SCALARS))


def group(spec: RunSpec) -> str:
    """The key shared by the runs that can be one population: ``spec``'s config without the keys in
    which members may differ (module docstring)."""
    flat = traverse_util.flatten_dict(spec.config.to_dict(), sep=".")
    return json.dumps({k: v for k, v in flat.items() if k not in _free(spec)}, sort_keys=True,
                      default=repr)


def refusal(spec: RunSpec) -> str | None:
    """Why the run ``spec`` cannot be a population member, or None."""
    if jax.process_count() > 1 or (spec.devices or jax.device_count()) > 1:
        return "it trains on several devices"
    if spec.data.streamed:
        return "its data are streamed"
    if spec.checkpoint_every_steps:
        return "it checkpoints within epochs"
    return None


@dataclasses.dataclass
class _Member:
    spec: RunSpec
    directory: rundir.RunDirectory
    run: experiment.Run
    writers: Writers
    key: jax.Array
    state: object
    begun: float

    def close(self, error: BaseException | None = None) -> None:
        """Closes the writers and the run directory (with ``error``: as a failed single run)."""
        self.writers.close()
        self.directory.__exit__(None if error is None else type(error), error,
                                None if error is None else error.__traceback__)


def _open(spec: RunSpec, out: epath.Path) -> _Member:
    """A member's run directory, claimed and prepared as a new single run's."""
    init_key, key = jax.random.split(jax.random.key(spec.seed))
    directory = rundir.RunDirectory(out, writer=placement.writer()).__enter__()
    try:
        run = experiment.prepare(spec, directory, True, False, init_key)
        state = experiment.pretrained(spec, run, run.start.state, key)
        writers = run.writers(spec, console=False)
    except BaseException as error:
        directory.__exit__(type(error), error, error.__traceback__)
        raise
    return _Member(spec, directory, run, writers, key, state, time.perf_counter())


def _stacked(members: Sequence[_Member]) -> population.Population:
    """The members' states as one population. Where their optimizers' values differ, each member's
    transformation is ``optim.scheduled`` of its own values (the population's ``make_tx``); else
    member 0's transformation serves all."""
    options = [dataclasses.replace(m.spec.optimizer, steps_per_epoch=m.run.steps_per_epoch).options()
               for m in members]
    varied = [k for k in options[0] if any(o[k] != options[0][k] for o in options)]
    first = members[0].state
    if not varied:
        return population.stack([m.state.replace(tx=first.tx, feedback_tx=first.feedback_tx)
                                 for m in members])
    dtype = jax.tree.leaves(first.params)[0].dtype
    make_tx = functools.partial(optim.scheduled, dtype=dtype,
                                **{k: v for k, v in options[0].items() if k not in varied})
    return population.stack([m.state for m in members], {k: [o[k] for o in options] for k in varied},
                            make_tx=make_tx)


def _epoch(members: list[_Member], epoch: int) -> dict[int, BaseException]:
    """One epoch of every member; returns the members (by index) whose epoch failed."""
    spec, dataset = members[0].spec, members[0].run.source.dataset
    epoch_start = time.perf_counter()
    pop, steps = population.train_epoch(
        _stacked(members), dataset.train_images, dataset.train_labels,
        jax.numpy.stack([jax.random.fold_in(m.key, epoch) for m in members]), spec.data.batch_size,
        spec.data.augment)
    failed = {}
    for i, m in enumerate(members):
        m.state = population.member(pop, i)
        try:
            experiment.finish_epoch(m.run, m.state, jax.tree.map(lambda a, i=i: a[i], steps),
                                    m.writers, epoch, epoch_start, m.directory.commit)
        except experiment.DivergenceError as error:
            failed[i] = error
    return failed


def run(specs: Sequence[RunSpec], outs: Sequence[str | epath.Path], progress: bool = True
        ) -> list[dict | experiment.DivergenceError]:
    """Trains the new runs ``specs`` (of one ``group``) as one population into ``outs``; returns
    each member's summary, or the ``DivergenceError`` that stopped it."""
    free = _free(specs[0])
    for i, other in enumerate(specs[1:], 1):
        changes = [c for c in resume.changes(specs[0].config, other.config)
                   if c.split(":")[0] not in free]
        if changes:
            raise ValueError(f"population: run {i} differs from run 0 in more than {', '.join(free)}: "
                             + "; ".join(changes))
    results: list = [None] * len(specs)
    members, index = [], []
    try:
        for i, (spec, out) in enumerate(zip(specs, outs)):
            members.append(_open(spec, epath.Path(out)))
            index.append(i)
        for epoch in range(specs[0].epochs):
            for i, error in sorted(_epoch(members, epoch).items(), reverse=True):
                members.pop(i).close(error)
                results[index.pop(i)] = error
            if progress:
                print(f"population of {len(members)}: epoch {epoch + 1}/{specs[0].epochs}",
                      flush=True)
            if not members:
                break
        for i, m in zip(index, members):
            results[i] = experiment.write_summary(m.spec, m.run, m.state, m.key, m.writers.lines,
                                                  time.perf_counter() - m.begun)
            m.directory.commit()
    except BaseException as error:
        while members:
            members.pop().close(error)
        raise
    while members:
        members.pop().close()
    return results
