"""Achieved FLOP rate of a compiled training epoch (ffn2 on Fashion-MNIST), against the machine's
measured float32 matmul rate.

For every rule: one epoch of ``ffn2`` (784-512-512-10) on the real Fashion-MNIST training set
(``pfa_jax.app.data.load('fashion_mnist')``, 60,000 images) as ``pfa_jax.train.train_epoch`` with
``loop='scan'`` (one ``lax.scan`` of ``train_step``, shuffled, batch 64 by default), timed
interleaved over the rules (``--repeats`` rounds after one compiling epoch), and the FLOPs it does.

FLOPs per train step, counted analytically (matrix products only; a multiply-add is 2 FLOPs). For a
dense layer ``l`` with ``i`` inputs, ``o`` outputs, batch ``n``, classes ``C`` and ``first`` = the
layer reads the images (its input gradient is dead code, which XLA removes):

    forward      2 n i o
    kernel grad  2 n i o                                       (every rule: dK = x^T g)
    input grad   0 if first, else by rule:
                 bp, fa, usf, brsf, frsf, kp, wm:  2 n o i     (g F^T)
                 dfa:                              2 n C i     (e B)
    pfa / pfa_o, mid m = r o, per layer the route ``route='auto'`` picks (``choose_route``):
                 "mid":      h = g Bp: 2 n o m;  dR = x^T h: 2 n i m;  dx = h R^T: 2 n m i (not first)
                 "product":  dR = dK Bp: 2 i o m;  F = R Bp^T: 2 i m o and dx = g F^T: 2 n o i
                             (both not first)
    wm mirror step (after every train step, noise batch N = 256):  4 N i o   (xi K, then xi^T (xi K))

Elementwise work (bias, ReLU, softmax, optimizer) is left out of the analytic count; XLA's own count
(``jax.jit(train_step).lower(state, batch).compile().cost_analysis()['flops']``, per step, which does
include it) is reported next to it. (The compiled epoch's own cost analysis counts the scan body once,
so the per-step figure is the one used.)

The matmul rate is measured in the same run: each distinct matrix product of bp's train step at
this batch (forward ``(n, i) x (i, o)``, kernel grad ``(i, n) x (n, o)``, input grad
``(n, o) x (o, i)``), each in a compiled ``lax.scan`` of 50 products over fresh left operands (as the
epoch reads fresh batches), and one large ``1024 x 1024 x 1024`` product. The "matched peak" is the
total FLOPs of bp's products divided by their total measured time: the rate this machine reaches on
exactly the shapes a train step needs; the achieved fraction of every rule is given against both
that and the large-product rate. Target: bp's epoch reaches >= 50% of the matched peak.

Prints JSON (also to ``--json PATH``), then markdown tables. Runs on ``jax.devices()[0]``.

    .venv/bin/python benchmarks/epoch_flops.py [--batch 64 [256 ...]] [--rules bp pfa ...]
        [--repeats 3] [--quick] [--json PATH]

``--quick``: the first 4096 training images, 1 round.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from common import interleaved_ms, machine, markdown_table, parser, report, train_state
from jax import lax

import pfa_jax as pj
from pfa_jax.app import data as app_data
from pfa_jax.rules.product_feedback import choose_route

WIDTHS = (784, 512, 512, 10)
CLASSES = 10
TARGET_FRACTION = 0.5
SCAN_LENGTH = 50


def layer_flops(rule, n: int, i: int, o: int, first: bool) -> dict[str, int]:
    """Analytic FLOPs of one dense layer's train step under ``rule`` (see module docstring)."""
    f = {"forward": 2 * n * i * o, "kernel_grad": 2 * n * i * o, "input_grad": 0, "feedback": 0}
    if rule.name in ("pfa", "pfa_o"):
        m = rule.mid(o)
        route = choose_route(rule.route, (n, o), (i, o), m, 1)
        if route == "mid":
            f["feedback"] = 2 * n * o * m + 2 * n * i * m
            f["input_grad"] = 0 if first else 2 * n * m * i
        else:
            f["feedback"] = 2 * i * o * m + (0 if first else 2 * i * m * o)
            f["input_grad"] = 0 if first else 2 * n * o * i
        f["route"] = route
    elif rule.name == "dfa":
        f["input_grad"] = 0 if first else 2 * n * CLASSES * i
    else:
        f["input_grad"] = 0 if first else 2 * n * o * i
    if rule.name == "wm":
        f["feedback"] = 4 * rule.noise_batch * i * o * rule.steps
    return f


def step_flops(rule_name: str, n: int) -> dict:
    rule = pj.nn.resolve_rule(pj.nn.bind_classes(rule_name, CLASSES), "")
    layers = {name: layer_flops(rule, n, i, o, first=k == 0) for k, (name, i, o) in enumerate(
        zip(["hidden_0", "hidden_1", "output"], WIDTHS[:-1], WIDTHS[1:]))}
    total = sum(v for f in layers.values() for k, v in f.items() if k != "route")
    return {"total": total, "layers": layers}


def xla_step_flops(state, batch) -> float | None:
    try:
        cost = jax.jit(pj.train.train_step).lower(state, batch).compile().cost_analysis()
    except Exception:  # noqa: BLE001 -- not every backend implements cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_variant(m: int, k: int, n: int, length: int, seed: int):
    """A zero-argument callable: ``length`` products ``(m, k) x (k, n)`` in one compiled scan."""
    a_key, b_key = jax.random.split(jax.random.key(seed))
    lhs = jax.random.normal(a_key, (length, m, k), jnp.float32)
    rhs = jax.random.normal(b_key, (k, n), jnp.float32)

    @jax.jit
    def run(lhs, rhs):
        def body(acc, a):
            return acc + jnp.dot(a, rhs), None
        return lax.scan(body, jnp.zeros((m, n), jnp.float32), lhs)[0]

    return lambda: run(lhs, rhs)


def bp_products(n: int) -> list[tuple[str, int, int, int]]:
    """The (name, m, k, n) matrix products of bp's ffn2 train step at batch ``n``."""
    out = []
    for k, (i, o) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        out += [(f"fwd {n}x{i}x{o}", n, i, o), (f"dK {i}x{n}x{o}", i, n, o)]
        if k:
            out.append((f"dx {n}x{o}x{i}", n, o, i))
    return out


def matmul_rates(batch_sizes, repeats: int) -> dict:
    shapes = {name: (m, k, n) for b in batch_sizes for name, m, k, n in bp_products(b)}
    variants = {name: matmul_variant(*s, SCAN_LENGTH, seed) for seed, (name, s) in
                enumerate(shapes.items())}
    variants["large 1024x1024x1024"] = matmul_variant(1024, 1024, 1024, 4, 99)
    times = interleaved_ms(variants, repeats)
    rates = {}
    for name, t in times.items():
        m, k, n = shapes.get(name, (1024, 1024, 1024))
        length = SCAN_LENGTH if name in shapes else 4
        rates[name] = {"shape": [m, k, n], "per_product_ms": t["median_ms"] / length,
                       "gflops": 2 * m * k * n * length / (t["median_ms"] * 1e6)}
    matched = {}
    for b in batch_sizes:
        flops = sum(2 * m * k * n for _, m, k, n in bp_products(b))
        seconds = sum(rates[name]["per_product_ms"] for name, *_ in bp_products(b)) / 1000
        matched[str(b)] = flops / seconds / 1e9
    return {"products": rates, "matched_gflops": matched,
            "large_gflops": rates["large 1024x1024x1024"]["gflops"]}


def main(argv=None) -> None:
    p = parser(__doc__, repeats=3)
    p.add_argument("--rules", nargs="+", default=list(pj.rules.names()), choices=pj.rules.names())
    p.add_argument("--batch", nargs="+", type=int, default=[64])
    p.add_argument("--data-dir", help="Fashion-MNIST IDX directory (default: pfa_jax.app.data's)")
    args = p.parse_args(argv)
    info = machine()
    rules = list(dict.fromkeys(["bp", *args.rules]))
    repeats = 1 if args.quick else args.repeats
    data = app_data.load("fashion_mnist", data_dir=args.data_dir, limit=4096 if args.quick else None)
    images, labels = jax.device_put(data.train_images), jax.device_put(data.train_labels)
    key = jax.random.key(0)

    peaks = matmul_rates(args.batch, 5 if args.quick else 20)
    results = {}
    for b in args.batch:
        steps = images.shape[0] // b
        states = {r: train_state("ffn2", r, {"image": images[:b]}) for r in rules}
        xla = {r: xla_step_flops(states[r], {"image": images[:b], "label": labels[:b]})
               for r in rules}

        def epoch(rule, b=b):
            def run():
                states[rule], metrics = pj.train.train_epoch(states[rule], images, labels, key,
                                                             batch_size=b, loop="scan")
                return metrics
            return run

        times = interleaved_ms({r: epoch(r) for r in rules}, repeats, warmup=1)
        matched, large = peaks["matched_gflops"][str(b)], peaks["large_gflops"]
        rows = {}
        for r in rules:
            flops = step_flops(r, b)
            seconds = times[r]["median_ms"] / 1000
            achieved = flops["total"] * steps / seconds / 1e9
            rows[r] = {"epoch_s": seconds, "epoch": times[r], "steps": steps,
                       "step_ms": 1000 * seconds / steps,
                       "analytic_flops_per_step": flops["total"], "layers": flops["layers"],
                       "xla_flops_per_step": xla[r],
                       "achieved_gflops": achieved, "xla_achieved_gflops":
                           xla[r] * steps / seconds / 1e9 if xla[r] else None,
                       "fraction_of_matched_peak": achieved / matched,
                       "fraction_of_large_peak": achieved / large}
        bp = rows["bp"]["fraction_of_matched_peak"]
        results[str(b)] = {"rules": rows, "matched_peak_gflops": matched, "large_peak_gflops": large,
                           "target": {"rule": "bp", "fraction_of_matched_peak": TARGET_FRACTION,
                                      "value": bp, "verdict": "pass" if bp >= TARGET_FRACTION
                                      else "FAIL"}}
    tables = {"float32 matmul rate (same run)": markdown_table(
        ["product", "ms each", "GFLOP/s"],
        [[name, v["per_product_ms"], v["gflops"]] for name, v in peaks["products"].items()])}
    for b, r in results.items():
        tables[f"ffn2 epoch on Fashion-MNIST, batch {b} (matched peak {r['matched_peak_gflops']:.1f}"
               f" GFLOP/s, large {r['large_peak_gflops']:.1f})"] = markdown_table(
            ["rule", "epoch s", "ms/step", "GFLOP/step (analytic)", "GFLOP/step (XLA)",
             "GFLOP/s", "of matched peak", "of large peak"],
            [[name, v["epoch_s"], v["step_ms"], v["analytic_flops_per_step"] / 1e9,
              v["xla_flops_per_step"] / 1e9 if v["xla_flops_per_step"] else None,
              v["achieved_gflops"], f"{100 * v['fraction_of_matched_peak']:.0f}%",
              f"{100 * v['fraction_of_large_peak']:.0f}%"] for name, v in r["rules"].items()])
    report({"benchmark": "epoch_flops", "machine": info,
            "config": {"model": "ffn2", "widths": list(WIDTHS), "dataset": "fashion_mnist",
                       "train_examples": int(images.shape[0]), "rules": rules, "repeats": repeats,
                       "quick": args.quick, "peak_denominator": "matched (bp's products at this "
                       "batch, measured in this run)"},
            "matmul": peaks, "results": results}, tables, args.json)


if __name__ == "__main__":
    main()
