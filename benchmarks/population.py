"""Member throughput of a population (``pfa_jax.population``) against the same members run one
after another.

For each model (``ffn2`` at batch 64 on 28x28x1 with P = 1, 4, 16, 64; ResNet-20 at batch 128 on
32x32x3 with P = 1, 4) and rule (``bp``, ``pfa``), with SGD (momentum 0.9, each member its own
learning rate), one epoch of ``STEPS`` batches of random images (each member its own shuffle), three
variants are timed interleaved (``common.interleaved_ms``):

* ``single``: ``pfa_jax.train.train_epoch`` of a single member (on a fresh copy of its state, as the
  epoch donates it); P members run one after another take P times its median;
* ``vmap`` and ``sequential``: ``pfa_jax.population.train_epoch`` of all P members with that
  strategy (``pfa_jax.population``; ``auto`` picks ``sequential`` on CPU, ``vmap`` elsewhere).

``speedup`` = member-epochs per second of a population over those of single runs one after
another, ``P * single_ms / population_ms``. Targets, for the strategy ``auto`` picks on the device:
on a GPU, at least 8 for ffn2 at P = 16; on CPU, at least 1.0 (no slower than single runs) for every
P > 1. Prints JSON (also to ``--json PATH``), then a markdown table. ``--models`` and
``--strategies`` time a subset (on CPU a vmapped ResNet-20 runs its convolutions as slow grouped
ones, so one round of it takes minutes: ``--models resnet20 --strategies sequential`` there).

    .venv/bin/python benchmarks/population.py [--repeats 10] [--quick] [--json PATH]
        [--models ffn2,resnet20] [--strategies vmap,sequential]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from common import interleaved_ms, machine, markdown_table, parser, random_batch, report, verdict

import pfa_jax as pj

CASES = {"ffn2": ((28, 28, 1), 64, (1, 4, 16, 64)), "resnet20": ((32, 32, 3), 128, (1, 4))}
RULES = ("bp", "pfa")
GPU_TARGET = {"ffn2": {16: 8.0}}  # P -> least speedup on a GPU
CPU_TARGET = 1.0                  # least speedup on CPU, every P > 1
STRATEGIES = ("vmap", "sequential")
STEPS = 20  # batches per timed epoch


def target(name: str, members: int) -> float | None:
    if jax.default_backend() == "cpu":
        return CPU_TARGET if members > 1 else None
    return GPU_TARGET.get(name, {}).get(members)


def variants(name: str, rule: str, shape, batch_size: int, members: int, strategies) -> dict:
    model = pj.models.get(name, rule=rule)
    data = random_batch((STEPS * batch_size, *shape))
    images, labels = data["image"], data["label"]
    rates = [0.01 * (1 + i % 4) for i in range(members)]
    pop = pj.population.create(jax.random.split(jax.random.key(0), members), model, images[:1],
                               optax.sgd, learning_rate=rates, momentum=0.9)
    keys = jax.random.split(jax.random.key(1), members)
    single = pj.population.member(pop, 0)
    return {"single": lambda: pj.train.train_epoch(jax.tree.map(jnp.copy, single), images, labels,
                                                   keys[0], batch_size),
            **{strategy: lambda strategy=strategy: pj.population.train_epoch(
                pop, images, labels, keys, batch_size, donate=False, strategy=strategy)
               for strategy in strategies}}


def main(argv=None):
    p = parser(__doc__, repeats=10)
    p.add_argument("--models", default=",".join(CASES), help="comma-separated, of " + ", ".join(CASES))
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, of "
                   + ", ".join(STRATEGIES))
    args = p.parse_args(argv)
    models, strategies = args.models.split(","), tuple(args.strategies.split(","))
    for value, valid, what in ((models, CASES, "--models"), (strategies, STRATEGIES, "--strategies")):
        if not value or set(value) - set(valid):
            p.error(f"{what}={','.join(value)!s} names none or unknown ones; valid: {', '.join(valid)}")
    repeats = 1 if args.quick else args.repeats
    results, rows = {}, []
    for name, (shape, batch_size, sizes) in CASES.items():
        if name not in models:
            continue
        batch_size = 8 if args.quick else batch_size
        for rule in RULES:
            for members in sizes[:2] if args.quick else sizes:
                times = interleaved_ms(variants(name, rule, shape, batch_size, members, strategies),
                                       repeats)
                single = times["single"]["median_ms"]
                speedup = {s: members * single / times[s]["median_ms"] for s in strategies}
                goal, auto = target(name, members), pj.population.resolve("auto")
                results[f"{name}/{rule}/P{members}"] = {
                    "batch": batch_size, "steps_per_epoch": STEPS, "members": members,
                    "times": times, "speedup": speedup,
                    "auto": auto, "members_per_s_single": 1000 / single,
                    **{f"members_per_s_{s}": 1000 * members / times[s]["median_ms"]
                       for s in strategies}, "target": goal}
                rows.append([name, rule, members, batch_size, single,
                             *[times[s]["median_ms"] if s in times else None for s in STRATEGIES],
                             *[speedup.get(s) for s in STRATEGIES], auto, goal,
                             "" if goal is None or auto not in speedup
                             else verdict(-speedup[auto], -goal)])
    table = markdown_table(["model", "rule", "P", "batch", "single epoch ms", "vmap ms",
                            "sequential ms", "vmap speedup", "sequential speedup", "auto",
                            "target", "verdict (auto)"], rows)
    report({"machine": machine(), "models": models, "strategies": list(strategies), "results": results,
            "targets": {"gpu": GPU_TARGET, "cpu_every_p_above_1": CPU_TARGET}},
           {"Population against sequential members": table}, args.json)


if __name__ == "__main__":
    main()
