"""Step time of the Flax NNX train step against the linen ``train_step``.

The same model (``ffn2`` at batch 64 on 28x28x1, ResNet-20 at batch 128 on 32x32x3), rule (``bp``,
``pfa``) and optimizer (SGD, momentum 0.9, lr 0.01), random images and labels. Three variants,
timed interleaved (``common.interleaved_ms``), each on the same state every call:

* ``linen``: ``jax.jit(pfa_jax.train.train_step)``;
* ``nnx``: ``pfa_jax.nnx.train_step`` inside ``jax.jit`` with ``nnx.split`` / ``nnx.merge`` around
  it (the functional NNX form: no Python graph traversal per call);
* ``nnx.jit``: ``nnx.jit(pfa_jax.nnx.train_step)`` on the model and optimizer objects (which walks
  the object graph in Python on every call).

Target: ``nnx`` / ``linen`` at most 1.05 for each model and rule. Prints JSON (also to
``--json PATH``), then a markdown table.

    .venv/bin/python benchmarks/nnx_step.py [--repeats 10] [--quick] [--json PATH]
"""
from __future__ import annotations

import jax
import optax
from common import interleaved_ms, machine, markdown_table, parser, random_batch, report, verdict
from flax import nnx

import pfa_jax as pj

CASES = {"ffn2": ((28, 28, 1), 64), "resnet20": ((32, 32, 3), 128)}
RULES = ("bp", "pfa")
TARGET = 1.05


def variants(name: str, rule: str, batch: dict) -> dict:
    tx = optax.sgd(0.01, momentum=0.9)
    shape = batch["image"].shape[1:]
    model = pj.nnx.models.get(name, rule=rule, input_shape=shape, rngs=nnx.Rngs(0))
    optimizer = pj.nnx.optimizer(model, tx)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def functional(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = pj.nnx.train_step(model, optimizer, batch)
        return nnx.state((model, optimizer)), metrics

    objects = nnx.clone((model, optimizer))
    object_step = nnx.jit(pj.nnx.train_step)
    linen = pj.train.create_train_state(jax.random.key(0), model.linen, batch["image"][:1], tx)
    linen_step = jax.jit(pj.train.train_step)
    return {"linen": lambda: linen_step(linen, batch), "nnx": lambda: functional(state, batch),
            "nnx.jit": lambda: object_step(*objects, batch)}


def main(argv=None):
    args = parser(__doc__, repeats=10).parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    results, rows = {}, []
    for name, (shape, batch_size) in CASES.items():
        batch = random_batch((8 if args.quick else batch_size, *shape))
        for rule in RULES:
            times = interleaved_ms(variants(name, rule, batch), repeats)
            median = {k: t["median_ms"] for k, t in times.items()}
            ratio = median["nnx"] / median["linen"]
            results[f"{name}/{rule}"] = {"batch": batch["image"].shape[0], "times": times,
                                         "nnx_over_linen": ratio,
                                         "nnx_jit_over_linen": median["nnx.jit"] / median["linen"]}
            rows.append([name, rule, batch["image"].shape[0], median["linen"], median["nnx"],
                         median["nnx.jit"], ratio, TARGET, verdict(ratio, TARGET)])
    table = markdown_table(["model", "rule", "batch", "linen ms", "nnx ms", "nnx.jit ms",
                            "nnx / linen", "target", "verdict"], rows)
    report({"machine": machine(), "results": results, "target": TARGET},
           {"NNX train step against linen": table}, args.json)


if __name__ == "__main__":
    main()
