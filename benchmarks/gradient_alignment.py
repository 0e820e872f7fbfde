"""What gradient alignment costs, against a training step on the same batch.

For ``ffn2`` (batch 256, 28x28x1) and ResNet-20 (batch 64, 32x32x3) with one rule (default PFA):
the median wall time of a jitted ``pfa_jax.train.train_step`` and of the jitted
``pfa_jax.metrics.gradient_alignment`` (two forward and two backward passes: the rule's and plain
autodiff's), measured interleaved over ``--repeats`` rounds after compilation and one warm-up run,
and their ratio. Prints JSON (and writes it to ``--json PATH``), then a markdown table.

    .venv/bin/python benchmarks/gradient_alignment.py [--rule pfa] [--repeats 20] [--quick]
"""
from __future__ import annotations

import jax

import pfa_jax as pj
from common import (IMAGE_SHAPES, interleaved_ms, machine, markdown_table, parser, random_batch,
                    report, train_state)

BATCHES = {"ffn2": 256, "resnet20": 64}


def measure(model_name: str, rule: str, batch_size: int, repeats: int) -> dict:
    batch = random_batch((batch_size,) + IMAGE_SHAPES[model_name])
    state = train_state(model_name, rule, batch)
    step = jax.jit(pj.train.train_step)
    times = interleaved_ms({"train_step": lambda: step(state, batch),
                            "gradient_alignment": lambda: pj.metrics.gradient_alignment(state, batch)},
                           repeats)
    step_ms, alignment_ms = (times[k]["median_ms"] for k in ("train_step", "gradient_alignment"))
    return {"batch_shape": list(batch["image"].shape), "train_step_ms": round(step_ms, 3),
            "gradient_alignment_ms": round(alignment_ms, 3),
            "ratio": round(alignment_ms / step_ms, 3), "timings": times}


def main(argv=None) -> None:
    p = parser(__doc__, repeats=20)
    p.add_argument("--rule", default="pfa", choices=pj.rules.names())
    p.add_argument("--models", nargs="+", default=list(BATCHES), choices=list(BATCHES))
    args = p.parse_args(argv)
    info = machine()
    repeats = 3 if args.quick else args.repeats
    results = {name: measure(name, args.rule, 16 if args.quick else BATCHES[name], repeats)
               for name in args.models}
    table = markdown_table(
        ["model", "batch", "train_step ms", "gradient_alignment ms", "ratio"],
        [[m, r["batch_shape"][0], r["train_step_ms"], r["gradient_alignment_ms"], r["ratio"]]
         for m, r in results.items()])
    report({"benchmark": "gradient_alignment", "machine": info, "rule": args.rule,
            "repeats": repeats, "results": results}, {f"gradient alignment cost ({args.rule})": table},
           args.json)


if __name__ == "__main__":
    main()
