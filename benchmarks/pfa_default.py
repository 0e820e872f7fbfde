"""The library's default PFA from your own code: ``pj.rules.get("pfa", expansion=r)`` (``form="auto"``)
in a model built with ``pj.models.get`` and trained with ``optax.sgd(0.01, momentum=0.9)`` after
coupled weight decay 1e-4, the state made by ``pj.train.create_train_state``, which decides the form
for that optimizer (``pfa_jax.rules.forms``), against backprop under the same optimizer.

* step time: median wall time of one jitted ``train_step`` (random data; bp and pfa interleaved,
  ``common.interleaved_ms``) on ffn2 (784-512-512-10) at batch 64, r = 10 and r = 50;
* memory: the compiled, donated step's memory analysis (``memory.analysis``) on ResNet-20 at
  batch 128, r = 10.

Targets: at most 1.5 x bp in time, at most 1.03 x bp in memory. Prints JSON (also to
``--json PATH``) with the form each state decided, then a markdown table.

    .venv/bin/python benchmarks/pfa_default.py [--repeats 20] [--quick] [--json PATH]

``--quick``: r = 10 only, no ResNet-20, 3 rounds.
"""
from __future__ import annotations

import jax
import optax
from common import (IMAGE_SHAPES, interleaved_ms, machine, markdown_table, parser, random_batch,
                    report, verdict)
from memory import analysis

import pfa_jax as pj

TARGETS = {"time": 1.5, "memory": 1.03}


def own_state(model_name: str, rule, batch: dict):
    """A state as own code makes it: a registry model, an optax SGD, ``create_train_state``."""
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, momentum=0.9))
    model = pj.models.get(model_name, rule=rule)
    return pj.train.create_train_state(jax.random.key(0), model, batch["image"][:1], tx)


def rules_at(ratio: int) -> dict:
    return {"bp": "bp", "pfa": pj.rules.get("pfa", expansion=ratio)}


def times(ratio: int, repeats: int) -> dict:
    batch = random_batch((64,) + IMAGE_SHAPES["ffn2"])
    states = {label: own_state("ffn2", rule, batch) for label, rule in rules_at(ratio).items()}
    step = jax.jit(pj.train.train_step)
    measured = interleaved_ms({label: (lambda s=s: step(s, batch)) for label, s in states.items()},
                              repeats)
    ratio_to_bp = round(measured["pfa"]["median_ms"] / measured["bp"]["median_ms"], 4)
    return {**measured, "form": states["pfa"].model.rule.form, "ratio_to_bp": ratio_to_bp,
            "verdict": verdict(ratio_to_bp, TARGETS["time"])}


def memory() -> dict:
    batch = random_batch((128,) + IMAGE_SHAPES["resnet20"])
    states = {label: own_state("resnet20", rule, batch) for label, rule in rules_at(10).items()}
    totals = {label: analysis(s, batch, donate=True) for label, s in states.items()}
    if totals["bp"] is None:
        return {"available": False}
    ratio = round(totals["pfa"]["total_bytes"] / totals["bp"]["total_bytes"], 4)
    return {"available": True, "form": states["pfa"].model.rule.form,
            **{label: t["total_bytes"] for label, t in totals.items()}, "ratio_to_bp": ratio,
            "verdict": verdict(ratio, TARGETS["memory"])}


def main(argv=None) -> None:
    args = parser(__doc__, repeats=20).parse_args(argv)
    info = machine()
    repeats = 3 if args.quick else args.repeats
    results = {f"ffn2 batch 64 r={r}": times(r, repeats) for r in ((10,) if args.quick else (10, 50))}
    rows = [[point, t["bp"]["median_ms"], t["pfa"]["median_ms"], t["form"], t["ratio_to_bp"],
             t["verdict"]] for point, t in results.items()]
    out = {"benchmark": "pfa_default", "machine": info,
           "config": {"repeats": repeats, "quick": args.quick, "targets": TARGETS},
           "results": {"time": results}}
    if not args.quick:
        out["results"]["memory"] = mem = memory()
        if mem["available"]:
            rows.append(["resnet20 batch 128 r=10 memory (MiB)", mem["bp"] / 2 ** 20,
                         mem["pfa"] / 2 ** 20, mem["form"], mem["ratio_to_bp"], mem["verdict"]])
    report(out, {"the library's default pfa under optax.sgd, against bp": markdown_table(
        ["point", "bp", "pfa", "form", "pfa / bp", "verdict"], rows)}, args.json)


if __name__ == "__main__":
    main()
