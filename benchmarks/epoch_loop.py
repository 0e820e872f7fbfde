"""Epoch time with ``loop='scan'`` (one compiled ``lax.scan`` of ``train_step``) against
``loop='steps'`` (one compiled step per batch, called from Python), per train step.

``pfa_jax.train.train_epoch`` on random N(0, 1) images with random labels: ``ffn2`` with ``bp`` and
``pfa`` (28x28x1, batch 64, 64 steps) and ``resnet20`` with ``bp`` (32x32x1, batch 128, 2 steps: a
scan of ResNet-20 steps takes 17 s a step on 2 CPU cores, so few). Both loops timed interleaved
(``--repeats`` rounds after one compiling epoch). On CPU XLA runs convolutions inside a loop body
far slower than the same convolutions outside one (jax-ml/jax#12868), which is why ``loop='auto'``
picks ``steps`` there for conv models; an MLP's scan is a little faster. Prints JSON (also to
``--json PATH``), then a markdown table.

    .venv/bin/python benchmarks/epoch_loop.py [--repeats 2] [--quick] [--json PATH]
"""
from __future__ import annotations

import jax
from common import interleaved_ms, machine, markdown_table, parser, random_batch, report, train_state

import pfa_jax as pj

CASES = {"ffn2": ((28, 28, 1), 64, 64, ("bp", "pfa")), "resnet20": ((32, 32, 1), 128, 2, ("bp",))}
QUICK_CASES = {"ffn2": ((28, 28, 1), 16, 8, ("bp",)), "resnet20": ((32, 32, 1), 8, 2, ("bp",))}
LOOPS = ("scan", "steps")


def epoch_variant(model_name: str, rule: str, shape, batch_size: int, steps: int, loop: str):
    """A zero-argument callable training one epoch of ``steps`` batches (state carried over)."""
    data = random_batch((batch_size * steps,) + shape)
    holder = {"state": train_state(model_name, rule, data)}

    def run():
        holder["state"], metrics = pj.train.train_epoch(
            holder["state"], data["image"], data["label"], jax.random.key(0), batch_size, loop=loop)
        return metrics
    return run


def main(argv=None):
    args = parser(__doc__, repeats=2).parse_args(argv)
    cases = QUICK_CASES if args.quick else CASES
    repeats = 1 if args.quick else args.repeats
    results, rows = {}, []
    for model_name, (shape, batch_size, steps, rules) in cases.items():
        for rule in rules:
            times = interleaved_ms({loop: epoch_variant(model_name, rule, shape, batch_size, steps,
                                                        loop) for loop in LOOPS}, repeats, warmup=1)
            per_step = {loop: times[loop]["median_ms"] / steps for loop in LOOPS}
            results[f"{model_name}/{rule}"] = {"batch": batch_size, "steps": steps, "epochs": times,
                                               "step_ms": per_step,
                                               "scan_over_steps": per_step["scan"] / per_step["steps"]}
            rows.append([model_name, rule, batch_size, per_step["scan"], per_step["steps"],
                         per_step["scan"] / per_step["steps"]])
    table = markdown_table(["model", "rule", "batch", "scan ms/step", "steps ms/step",
                            "scan / steps"], rows)
    report({"machine": machine(), "results": results}, {"epoch loop": table}, args.json)


if __name__ == "__main__":
    main()
