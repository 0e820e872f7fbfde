"""Step time of the plain Flax functional pattern against the library's ``train_step``.

The functional pattern is what a research user writes without ``pfa_jax.train``:
``variables = model.init(...)``; one ``jax.value_and_grad`` of a loss whose forward pass is
``model.apply(variables, x, train=True, mutable=[every collection init returned but params,
'error_taps'])``; optax (SGD, momentum 0.9, lr 0.01) on ``params`` and on the plastic feedback that
``pfa_jax.layers.feedback_labels`` names. ResNet-20, batch 128, 32x32x3, random images and labels,
for ``bp`` and ``pfa``; both steps jitted, timed interleaved (``common.interleaved_ms``). Targets:
functional / ``train_step`` at most 1.05 for each rule, and PFA / BP on the functional pattern at
most 1.10. Prints JSON (also to ``--json PATH``), then a markdown table.

    .venv/bin/python benchmarks/functional_pattern.py [--repeats 10] [--quick] [--json PATH]
"""
from __future__ import annotations

import jax
import optax
from common import interleaved_ms, machine, markdown_table, parser, random_batch, report, verdict

import pfa_jax as pj

RULES = ("bp", "pfa")
TARGET_OVER_TRAIN_STEP, TARGET_PFA_OVER_BP = 1.05, 1.10


def functional_variant(model, batch: dict):
    """The plain Flax step on ``model`` (see the module docstring), as a zero-argument callable."""
    tx = optax.sgd(0.01, momentum=0.9)
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, batch["image"][:1])
    variables = {"feedback": {}, **variables}
    labels = pj.layers.feedback_labels(pj.layers.table(model, batch["image"][:1]),
                                       variables["feedback"])
    plastic = pj.layers.select(variables["feedback"], labels, pj.layers.PLASTIC)
    carried = {k: v for k, v in variables.items() if k != "params"}
    mutable = [k for k in variables if k not in ("params", "feedback")] + ["error_taps"]

    @jax.jit
    def step(params, plastic, carried, opt_state):
        def loss_fn(params, plastic):
            feedback = pj.layers.merge(carried["feedback"], plastic)
            logits, updates = model.apply({**carried, "params": params, "feedback": feedback},
                                          batch["image"], train=True, mutable=mutable)
            return pj.train.cross_entropy(logits, batch["label"]).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(params, plastic)
        steps, opt_state = tx.update(grads, opt_state, (params, plastic))
        params, plastic = optax.apply_updates((params, plastic), steps)
        return params, plastic, {**carried, "batch_stats": updates["batch_stats"]}, opt_state, loss

    opt_state = tx.init((variables["params"], plastic))
    return lambda: step(variables["params"], plastic, carried, opt_state)


def train_step_variant(model, batch: dict):
    state = pj.train.create_train_state(jax.random.key(0), model, batch["image"][:1],
                                        optax.sgd(0.01, momentum=0.9))
    step = jax.jit(pj.train.train_step)
    return lambda: step(state, batch)


def main(argv=None):
    args = parser(__doc__, repeats=10).parse_args(argv)
    shape, repeats = ((8, 32, 32, 3), 1) if args.quick else ((128, 32, 32, 3), args.repeats)
    batch = random_batch(shape)
    variants = {}
    for rule in RULES:
        model = pj.models.get("resnet20", rule=rule)
        variants[f"{rule}/functional"] = functional_variant(model, batch)
        variants[f"{rule}/train_step"] = train_step_variant(model, batch)
    times = interleaved_ms(variants, repeats)
    median = {name: t["median_ms"] for name, t in times.items()}
    ratios = {f"{rule}: functional / train_step": median[f"{rule}/functional"]
              / median[f"{rule}/train_step"] for rule in RULES}
    ratios["functional: pfa / bp"] = median["pfa/functional"] / median["bp/functional"]
    targets = {name: TARGET_PFA_OVER_BP if name.startswith("functional") else
               TARGET_OVER_TRAIN_STEP for name in ratios}
    rows = [[name, ratio, targets[name], verdict(ratio, targets[name])]
            for name, ratio in ratios.items()]
    report({"machine": machine(), "batch": shape[0], "times": times, "ratios": ratios,
            "targets": targets},
           {"functional pattern, ResNet-20": markdown_table(["ratio", "measured", "target",
                                                             "verdict"], rows)}, args.json)


if __name__ == "__main__":
    main()
