"""Member throughput of a population (``pfa_jax.population``) against the same members run one
after another.

For each model (``ffn2`` at batch 64 on 28x28x1 with P = 1, 4, 16, 64; ResNet-20 at batch 128 on
32x32x3 with P = 1, 4) and rule (``bp``, ``pfa``), with SGD (momentum 0.9, each member its own
learning rate) and random images, each member its own batch, two variants are timed interleaved
(``common.interleaved_ms``):

* ``sequential``: one jitted ``pfa_jax.train.train_step`` of a single member; P members run one
  after another take P times its median;
* ``population``: one ``pfa_jax.population.train_step`` of all P members (one compiled program).

``speedup`` = member-steps per second of the population over those of sequential runs, ``P *
sequential_ms / population_ms``. Targets: on a GPU, at least 8 for ffn2 at P = 16; on CPU, at
least 1.0 (no slower than sequential) for every P > 1. Prints JSON (also to ``--json PATH``), then
a markdown table.

    .venv/bin/python benchmarks/population.py [--repeats 10] [--quick] [--json PATH]
"""
from __future__ import annotations

import jax
import optax

import pfa_jax as pj
from common import interleaved_ms, machine, markdown_table, parser, random_batch, report, verdict

CASES = {"ffn2": ((28, 28, 1), 64, (1, 4, 16, 64)), "resnet20": ((32, 32, 3), 128, (1, 4))}
RULES = ("bp", "pfa")
GPU_TARGET = {"ffn2": {16: 8.0}}  # P -> least speedup on a GPU
CPU_TARGET = 1.0                  # least speedup on CPU, every P > 1


def target(name: str, members: int) -> float | None:
    if jax.default_backend() == "cpu":
        return CPU_TARGET if members > 1 else None
    return GPU_TARGET.get(name, {}).get(members)


def variants(name: str, rule: str, shape, batch_size: int, members: int) -> dict:
    model = pj.models.get(name, rule=rule)
    batches = random_batch((members * batch_size, *shape))
    per_member = jax.tree.map(lambda a: a.reshape((members, batch_size) + a.shape[1:]), batches)
    rates = [0.01 * (1 + i % 4) for i in range(members)]
    pop = pj.population.create(jax.random.split(jax.random.key(0), members), model,
                               batches["image"][:1], optax.sgd, learning_rate=rates, momentum=0.9)
    single = pj.population.member(pop, 0)
    first = jax.tree.map(lambda a: a[0], per_member)
    step = jax.jit(pj.train.train_step)
    return {"sequential": lambda: step(single, first),
            "population": lambda: pj.population.train_step(pop, per_member, per_member=True,
                                                           donate=False)}


def main(argv=None):
    args = parser(__doc__, repeats=10).parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    results, rows = {}, []
    for name, (shape, batch_size, sizes) in CASES.items():
        batch_size = 8 if args.quick else batch_size
        for rule in RULES:
            for members in sizes[:2] if args.quick else sizes:
                times = interleaved_ms(variants(name, rule, shape, batch_size, members), repeats)
                sequential, population = (times[k]["median_ms"] for k in ("sequential", "population"))
                speedup = members * sequential / population
                goal = target(name, members)
                results[f"{name}/{rule}/P{members}"] = {
                    "batch": batch_size, "members": members, "times": times, "speedup": speedup,
                    "members_per_s_population": 1000 * members / population,
                    "members_per_s_sequential": 1000 / sequential, "target": goal}
                rows.append([name, rule, members, batch_size, sequential, population, speedup, goal,
                             "" if goal is None else verdict(-speedup, -goal)])
    table = markdown_table(["model", "rule", "P", "batch", "single step ms", "population step ms",
                            "speedup", "target", "verdict"], rows)
    report({"machine": machine(), "results": results,
            "targets": {"gpu": GPU_TARGET, "cpu_every_p_above_1": CPU_TARGET}},
           {"Population against sequential members": table}, args.json)


if __name__ == "__main__":
    main()
