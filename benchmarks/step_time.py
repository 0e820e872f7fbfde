"""Train-step time of every rule against backprop's.

For each model, the median wall time of one jitted ``pfa_jax.train.train_step`` (SGD momentum 0.9,
wd 1e-4, random N(0, 1) images and random labels, the same state every call) for every rule in
``pfa_jax.rules.names()``, all measured interleaved (round-robin over the rules, ``--repeats`` rounds
after compiling and one warm-up), and each rule's ratio to ``bp``:

* ``resnet20``, batch 128, 32x32x3, with targets: ``pfa`` (expansion 10) and ``pfa_o`` <= 1.10;
  ``fa``, ``usf``, ``frsf``, ``brsf``, ``kp`` <= 1.05; ``dfa`` <= 1.0; ``wm`` has no target; Two
  Routes' ``sa``, ``aa``, ``ia``, ``alignment`` (its default: no term, plastic ``B``) and DFA's
  variants ``sdfa`` (``signal='sign'``) and ``drtp`` (``signal='target'``), measured with ``dfa``,
  <= 1.10; ``aa`` and ``ia`` are also measured with ``probe_batch`` 16 and 8 (their alignment loss
  on that many rows of the batch), with the same target.
* ``ffn2``, batches 64 and 512, 28x28x1, no targets; ``pfa`` is also measured with each backward
  association forced (``route='mid'`` / ``'product'``) next to ``'auto'`` (the default, ``pfa`` in
  the table), with the route ``auto`` chose for each layer and whether it was the faster one.

Prints JSON (also to ``--json PATH``), then markdown tables. Runs on ``jax.devices()[0]``.

    .venv/bin/python benchmarks/step_time.py [--models resnet20 ffn2] [--rules bp pfa ...]
        [--batch N ...] [--repeats 20] [--quick] [--json PATH]

``--batch`` replaces the default batch sizes of every selected model; ``--quick`` is a smoke check
(batch 8 / 16, 2 rounds, ResNet-20 with bp, fa, pfa and dfa only unless ``--rules`` is given).
"""
from __future__ import annotations

from common import (IMAGE_SHAPES, interleaved_ms, machine, markdown_table, parser, random_batch,
                    report, rule_label, step_variant, verdict)

import pfa_jax as pj
from pfa_jax.rules.product_feedback import choose_route

BATCHES = {"resnet20": (128,), "ffn2": (64, 512)}
QUICK_BATCHES = {"resnet20": (8,), "ffn2": (16,)}
QUICK_RESNET_RULES = ("bp", "fa", "pfa", "dfa")  # --quick: fewer ResNet compiles (slow on GPUs)
TARGETS = {"resnet20": {"bp": 1.0, "pfa": 1.10, "pfa_o": 1.10, "fa": 1.05, "usf": 1.05,
                        "frsf": 1.05, "brsf": 1.05, "kp": 1.05, "dfa": 1.0, "wm": None}}
TARGETS["resnet20"].update(dict.fromkeys(("sa", "aa", "ia", "alignment", "sdfa", "drtp"), 1.10))
ROUTES = ("mid", "product")
DFA_VARIANTS = {"sdfa": "sign", "drtp": "target"}  # label -> dfa's option signal
PROBED, PROBE_BATCHES = ("aa", "ia"), (16, 8)  # also with their loss on 16 / 8 rows (probe_batch)
TARGETS["resnet20"].update({f"{name}(probe_batch={m})": 1.10
                            for name in PROBED for m in PROBE_BATCHES})


def dense_routes(widths, batch: int, rule) -> dict[str, str]:
    """The backward association ``route='auto'`` picks for each ``ffn2`` layer at this batch."""
    sizes = [784, *widths, 10]
    return {name: choose_route(rule.route, (batch, out), (fan_in, out), rule.mid(out), 1)
            for name, fan_in, out in zip([f"hidden_{i}" for i in range(len(widths))] + ["output"],
                                         sizes[:-1], sizes[1:])}


def measure(model_name: str, batch_size: int, rules, repeats: int, warmup: int) -> dict:
    batch = random_batch((batch_size,) + IMAGE_SHAPES[model_name])
    variants = {rule: step_variant(model_name, rule, batch) for rule in rules}
    if "dfa" in rules:
        for label, signal in DFA_VARIANTS.items():
            variants[label] = step_variant(model_name, pj.rules.get("dfa", signal=signal), batch)
    for name in PROBED:
        if name in rules:
            for m in PROBE_BATCHES:
                variants[f"{name}(probe_batch={m})"] = step_variant(
                    model_name, pj.rules.get(name, probe_batch=m), batch)
    with_routes = model_name == "ffn2" and "pfa" in rules
    if with_routes:
        for route in ROUTES:
            rule = pj.rules.get("pfa", route=route)
            variants[rule_label(rule)] = step_variant(model_name, rule, batch)
    times = interleaved_ms(variants, repeats, warmup)
    base = times["bp"]["median_ms"] if "bp" in times else None
    targets = TARGETS.get(model_name, {})
    out = {"batch": batch_size, "image_shape": list(IMAGE_SHAPES[model_name]), "rules": {}}
    for name, t in times.items():
        ratio = round(t["median_ms"] / base, 4) if base else None
        target = targets.get(name)
        out["rules"][name] = {**t, "ratio_to_bp": ratio, "target": target,
                              "verdict": verdict(ratio, target) if ratio is not None else ""}
    if with_routes:
        chosen = dense_routes((512, 512), batch_size, pj.rules.get("pfa"))
        pure = {route: times[f"pfa({route})"]["median_ms"] for route in ROUTES}
        faster = min(pure, key=pure.get)
        auto = times["pfa"]["median_ms"]
        out["pfa_routes"] = {
            "auto_choice": chosen, **{f"{r}_ms": v for r, v in pure.items()}, "auto_ms": auto,
            "faster_route": faster, "auto_over_faster": round(auto / pure[faster], 4),
            # auto picked the faster one if it chose it everywhere, or if its (mixed) choice is
            # within 5% of the faster pure route.
            "auto_picked_faster": bool(set(chosen.values()) == {faster}
                                       or auto <= 1.05 * pure[faster])}
    return out


def tables(results: dict) -> dict[str, str]:
    out = {}
    for model_name, by_batch in results.items():
        for batch_size, r in by_batch.items():
            rows = [[name, v["median_ms"], v["q1_ms"], v["q3_ms"], v["ratio_to_bp"],
                     v["target"] if v["target"] is not None else "", v["verdict"]]
                    for name, v in r["rules"].items()]
            out[f"{model_name}, batch {batch_size}: train step"] = markdown_table(
                ["rule", "median ms", "q1 ms", "q3 ms", "ratio to bp", "target", "verdict"], rows)
        routes = [[b, ", ".join(f"{k}: {v}" for k, v in r["pfa_routes"]["auto_choice"].items()),
                   r["pfa_routes"]["mid_ms"], r["pfa_routes"]["product_ms"], r["pfa_routes"]["auto_ms"],
                   r["pfa_routes"]["faster_route"], "yes" if r["pfa_routes"]["auto_picked_faster"]
                   else "NO"] for b, r in by_batch.items() if "pfa_routes" in r]
        if routes:
            out[f"{model_name}: PFA backward route"] = markdown_table(
                ["batch", "auto's choice per layer", "mid ms", "product ms", "auto ms",
                 "faster", "auto picked faster"], routes)
    return out


def main(argv=None) -> None:
    p = parser(__doc__, repeats=20)
    p.add_argument("--models", nargs="+", default=list(BATCHES), choices=list(BATCHES))
    p.add_argument("--rules", nargs="+", choices=pj.rules.names(), help="default: every rule")
    p.add_argument("--batch", nargs="+", type=int, help="batch sizes for every selected model")
    args = p.parse_args(argv)
    info = machine()
    rules = list(dict.fromkeys(["bp", *(args.rules or pj.rules.names())]))  # bp first
    repeats, warmup = (2, 1) if args.quick else (args.repeats, 2)
    results = {}
    for model_name in args.models:
        batches = args.batch or (QUICK_BATCHES if args.quick else BATCHES)[model_name]
        model_rules = (list(QUICK_RESNET_RULES) if args.quick and not args.rules
                       and model_name == "resnet20" else rules)
        results[model_name] = {str(b): measure(model_name, b, model_rules, repeats, warmup)
                               for b in batches}
    report({"benchmark": "step_time", "machine": info,
            "config": {"repeats": repeats, "warmup": warmup, "rules": rules, "quick": args.quick,
                       "optimizer": "sgd momentum 0.9, lr 0.01, wd 1e-4",
                       "data": "random N(0,1) images, random labels"},
            "results": results}, tables(results), args.json)


if __name__ == "__main__":
    main()
