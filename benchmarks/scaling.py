"""How train-step time scales with batch size, width, depth and PFA's expansion ratio, for bp, fa
and pfa.

Median wall time of one jitted ``pfa_jax.train.train_step`` (random data, SGD momentum 0.9,
wd 1e-4), the variants of each point measured interleaved (round-robin, ``--repeats`` rounds after
compiling and one warm-up), and each rule's ratio to bp at that point:

* batch:      ``ffn2`` (784-512-512-10) at batch 16, 64, 256, 1024;
* width:      ``ffn2`` with ``widths=(w, w)``, w in 128, 512, 2048, batch 64;
* depth:      ``ffn2`` with ``widths=(512,) * d``, d in 1, 2, 4, 8, batch 64; and ``resnet20`` against
              ``resnet56``, batch 32;
* expansion:  ``pfa`` with r in 1, 2, 5, 10, 20 (``mid = r * out``) on ``ffn2`` batch 64 and ``resnet20``
              batch 32, next to bp and fa.

The default run takes about 5 to 10 minutes on 2 CPU cores. Prints JSON (also to ``--json PATH``),
then markdown tables. Runs on ``jax.devices()[0]``.

    .venv/bin/python benchmarks/scaling.py [--sweeps batch width depth expansion] [--repeats 10]
        [--quick] [--json PATH]

``--quick``: two points per sweep at small sizes (expansion on ffn2 only), 2 rounds.
"""
from __future__ import annotations

from common import (IMAGE_SHAPES, interleaved_ms, machine, markdown_table, parser, random_batch,
                    report, step_variant)

import pfa_jax as pj

RULES = ("bp", "fa", "pfa")
FULL = {"batch": (16, 64, 256, 1024), "width": (128, 512, 2048), "mlp_depth": (1, 2, 4, 8),
        "resnet_depth": ("resnet20", "resnet56"), "expansion": (1, 2, 5, 10, 20),
        "mlp_batch": 64, "resnet_batch": 32, "expansion_models": ("ffn2", "resnet20")}
QUICK = {"batch": (16, 64), "width": (128, 512), "mlp_depth": (1, 2),
         "resnet_depth": ("resnet20",), "expansion": (1, 10), "mlp_batch": 16, "resnet_batch": 4,
         "expansion_models": ("ffn2",)}


def point(model_name: str, batch_size: int, rules, repeats: int, **model_options) -> dict:
    """Interleaved step times of ``rules`` (names or ``Rule``s, keyed by label) at one point."""
    batch = random_batch((batch_size,) + IMAGE_SHAPES[model_name])
    variants = {label: step_variant(model_name, rule, batch, **model_options)
                for label, rule in rules.items()}
    times = interleaved_ms(variants, repeats)
    base = times["bp"]["median_ms"]
    return {label: {**t, "ratio_to_bp": round(t["median_ms"] / base, 4)}
            for label, t in times.items()}


def sweep(name: str, cases: dict, repeats: int) -> dict:
    """``cases``: point label -> (model, batch, model options)."""
    rules = {r: r for r in RULES}
    return {label: {"model": m, "batch": b, "options": {k: list(v) for k, v in o.items()},
                    "rules": point(m, b, rules, repeats, **o)}
            for label, (m, b, o) in cases.items()}


def run(sweeps, sizes: dict, repeats: int) -> dict:
    out = {}
    if "batch" in sweeps:
        out["batch"] = sweep("batch", {str(b): ("ffn2", b, {}) for b in sizes["batch"]}, repeats)
    if "width" in sweeps:
        out["width"] = sweep("width", {str(w): ("ffn2", sizes["mlp_batch"], {"widths": (w, w)})
                                       for w in sizes["width"]}, repeats)
    if "depth" in sweeps:
        cases = {f"ffn2 x{d}": ("ffn2", sizes["mlp_batch"], {"widths": (512,) * d})
                 for d in sizes["mlp_depth"]}
        cases.update({m: (m, sizes["resnet_batch"], {}) for m in sizes["resnet_depth"]})
        out["depth"] = sweep("depth", cases, repeats)
    if "expansion" in sweeps:
        rules = {"bp": "bp", "fa": "fa"}
        rules.update({f"pfa r={r}": pj.rules.get("pfa", expansion=r) for r in sizes["expansion"]})
        out["expansion"] = {
            f"{m} batch {b}": {"model": m, "batch": b, "rules": point(m, b, rules, repeats)}
            for m, b in (("ffn2", sizes["mlp_batch"]), ("resnet20", sizes["resnet_batch"]))
            if m in sizes["expansion_models"]}
    return out


def tables(results: dict) -> dict[str, str]:
    out = {}
    for name, points in results.items():
        labels = list(next(iter(points.values()))["rules"])
        headers = ["point", "batch"] + [f"{r} ms" for r in labels] + [
            f"{r} / bp" for r in labels if r != "bp"]
        rows = [[p, v["batch"]] + [v["rules"][r]["median_ms"] for r in labels]
                + [v["rules"][r]["ratio_to_bp"] for r in labels if r != "bp"]
                for p, v in points.items()]
        out[f"train-step time against {name}"] = markdown_table(headers, rows)
    return out


def main(argv=None) -> None:
    p = parser(__doc__, repeats=10)
    p.add_argument("--sweeps", nargs="+", default=["batch", "width", "depth", "expansion"],
                   choices=["batch", "width", "depth", "expansion"])
    args = p.parse_args(argv)
    info = machine()
    sizes, repeats = (QUICK, 2) if args.quick else (FULL, args.repeats)
    results = run(args.sweeps, sizes, repeats)
    report({"benchmark": "scaling", "machine": info,
            "config": {"rules": list(RULES), "repeats": repeats, "quick": args.quick,
                       "sizes": {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in sizes.items()}},
            "results": results}, tables(results), args.json)


if __name__ == "__main__":
    main()
