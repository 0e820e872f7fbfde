"""PFA's cost in its storage forms (``pfa_jax.rules.product_feedback``): ``"R"`` (the authors'
``R: (in, r out)``), ``"F"`` (``F = R Bp^T`` and ``C = Bp Bp^T``: Kolen-Pollack's cost plus
``dF = dK C``) and ``"G"`` (``G = F C^-1``: ``dG = dK``, Kolen-Pollack's cost plus ``g C``; not at
r = 1, where ``C`` is ill-conditioned), against backprop.

* step time (beside Kolen-Pollack, ``kp``, the cost the forms aim at): median wall time of one jitted
  ``pfa_jax.train.train_step`` (random data, SGD
  momentum 0.9, wd 1e-4; the variants of a point interleaved, ``common.interleaved_ms``) on ffn2
  (784-512-512-10) at batch 64 and 512 for pfa with r in 1, 2, 5, 10, 20, 50 and for pfa_o, and on
  ResNet-20 at batch 128 (r = 10, the paper's);
* memory: on ResNet-20 batch 128, the compiled step's memory analysis (``memory.analysis``:
  argument + output - alias + temp), bp and pfa's forms.

Targets (issue: PFA at Kolen-Pollack's cost), for the form a run spec stores under SGD ("G", or "F"
at r = 1): at most 1.5 x bp in time at every ffn2 point, at most 1.05 x in time and 1.03 x in
memory on ResNet-20. Prints JSON (also to ``--json PATH``), then
markdown tables. The default run takes about 17 minutes on 2 CPU cores (the "R" form at r = 50 is
the slow part).

    .venv/bin/python benchmarks/pfa_forms.py [--repeats 10] [--quick] [--json PATH]

``--quick``: ffn2 batch 64, r in 1 and 10 and pfa_o, no ResNet-20, 2 rounds.
"""
from __future__ import annotations

from common import (IMAGE_SHAPES, interleaved_ms, machine, markdown_table, parser, random_batch,
                    report, step_variant, train_state, verdict)
from memory import analysis

import pfa_jax as pj

RATIOS = (1, 2, 5, 10, 20, 50, "pfa_o")
FORMS = ("R", "F", "G")
TARGETS = {"ffn2 time": 1.5, "resnet20 time": 1.05, "resnet20 memory": 1.03}


def rules_at(ratio) -> dict:
    """bp, kp and the forms of pfa at expansion ``ratio`` (or of pfa_o), "G" where it is allowed."""
    name, options = ("pfa_o", {}) if ratio == "pfa_o" else ("pfa", {"expansion": ratio})
    forms = [f for f in FORMS if f != "G" or pj.rules.get(name, **options).factorable]
    return {"bp": "bp", "kp": "kp", **{f: pj.rules.get(name, form=f, **options) for f in forms}}


def stored(rules: dict) -> str:
    """The form a run spec stores under SGD (``pfa_jax.app.spec``): "G" where allowed, else "F"."""
    return "G" if "G" in rules else "F"


def times(model_name: str, batch_size: int, ratio, repeats: int) -> dict:
    batch = random_batch((batch_size,) + IMAGE_SHAPES[model_name])
    variants = {label: step_variant(model_name, rule, batch)
                for label, rule in rules_at(ratio).items()}
    measured = interleaved_ms(variants, repeats)
    base = measured["bp"]["median_ms"]
    return {label: {**t, "ratio_to_bp": round(t["median_ms"] / base, 4)}
            for label, t in measured.items()}


def memory(batch_size: int) -> dict:
    batch = random_batch((batch_size,) + IMAGE_SHAPES["resnet20"])
    totals = {}
    for label, rule in rules_at(10).items():
        fields = analysis(train_state("resnet20", rule, batch), batch, donate=True)
        totals[label] = None if fields is None else fields["total_bytes"]
    if totals["bp"] is None:
        return {"available": False}
    return {"available": True, **{label: {"total_bytes": total,
                                          "ratio_to_bp": round(total / totals["bp"], 4)}
                                  for label, total in totals.items()}}


def main(argv=None) -> None:
    p = parser(__doc__, repeats=10)
    args = p.parse_args(argv)
    info = machine()
    repeats = 2 if args.quick else args.repeats
    points = [("ffn2", b, r) for b in ((64,) if args.quick else (64, 512))
              for r in ((1, 10, "pfa_o") if args.quick else RATIOS)]
    if not args.quick:
        points.append(("resnet20", 128, 10))
    label = lambda r: r if r == "pfa_o" else f"r={r}"
    results = {f"{m} batch {b} {label(r)}": {"model": m, "batch": b, "r": r,
                                        "rules": times(m, b, r, repeats)} for m, b, r in points}
    for point in results.values():
        point["stored"] = stored(point["rules"])
        point["verdict"] = verdict(point["rules"][point["stored"]]["ratio_to_bp"],
                                   TARGETS[f"{point['model']} time"])
    out = {"benchmark": "pfa_forms", "machine": info,
           "config": {"repeats": repeats, "quick": args.quick, "targets": TARGETS},
           "results": {"time": results}}
    column = lambda v, label, field: v["rules"].get(label, {}).get(field)
    rows = [[label, *(column(v, r, "median_ms") for r in ("bp", "kp", *FORMS)),
             *(column(v, r, "ratio_to_bp") for r in ("kp", *FORMS)), v["stored"], v["verdict"]]
            for label, v in results.items()]
    tables = {"train-step time, pfa forms": markdown_table(
        ["point", "bp ms", "kp ms", *(f"{f} ms" for f in FORMS), "kp / bp",
         *(f"{f} / bp" for f in FORMS), "stored", "verdict"], rows)}
    if not args.quick:
        mem = memory(128)
        if mem["available"]:
            mem["verdict"] = verdict(mem["G"]["ratio_to_bp"], TARGETS["resnet20 memory"])
        out["results"]["memory"] = mem
        if mem["available"]:
            tables["resnet20 batch 128, donated step memory (MiB)"] = markdown_table(
                ["rule", "total", "ratio to bp"],
                [[label, mem[label]["total_bytes"] / 2 ** 20, mem[label]["ratio_to_bp"]]
                 for label in ("bp", "kp", *FORMS)])
    report(out, tables, args.json)


if __name__ == "__main__":
    main()
