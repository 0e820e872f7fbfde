"""What gradient alignment costs, against a training step on the same batch.

For ``ffn2`` (batch 256, 28x28x1) and ResNet-20 (batch 64, 32x32x3) with one rule (default PFA):
the median wall time of a jitted ``pfa_jax.train.train_step`` and of the jitted
``pfa_jax.metrics.gradient_alignment`` (two forward and two backward passes: the rule's and plain
autodiff's) over ``--repeats`` runs after compilation and one warm-up run, and their ratio. Prints JSON.

    .venv/bin/python benchmarks/gradient_alignment.py [--rule pfa] [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

import pfa_jax as pj

CASES = {"ffn2": (256, 28, 28, 1), "resnet20": (64, 32, 32, 3)}


def median_ms(fn, args, repeats: int) -> float:
    """Median milliseconds of ``fn(*args)`` over ``repeats`` runs, after compiling and one warm-up."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(model_name: str, rule: str, repeats: int) -> dict:
    shape = CASES[model_name]
    images_key, labels_key, init_key = jax.random.split(jax.random.key(0), 3)
    batch = {"image": jax.random.normal(images_key, shape),
             "label": jax.random.randint(labels_key, shape[:1], 0, 10)}
    state = pj.train.create_train_state(init_key, pj.models.get(model_name, rule=rule),
                                        batch["image"][:1], {"learning_rate": 0.01})
    step = median_ms(jax.jit(pj.train.train_step), (state, batch), repeats)
    alignment = median_ms(pj.metrics.gradient_alignment, (state, batch), repeats)
    return {"batch_shape": list(shape), "train_step_ms": round(step, 3),
            "gradient_alignment_ms": round(alignment, 3), "ratio": round(alignment / step, 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", default="pfa", choices=pj.rules.names())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    results = {name: measure(name, args.rule, args.repeats) for name in args.models}
    print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__, "rule": args.rule,
                      "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
