"""Data-parallel train steps against the device count (weak scaling): bp and pfa on ``ffn2`` and
``resnet20`` with a fixed per-device batch, on 1, 2, 4, ... of the devices that exist.

Each point is one jitted ``pfa_jax.train.train_step`` the way ``pfa-jax train`` runs it
(``pfa_jax.app.placement``): the state replicated on the first ``n`` devices and the global batch
of ``n * per_device_batch`` random images split over them (sharded ``jit``). The counts of one
model are timed interleaved (round-robin, ``--repeats`` rounds after compiling and one warm-up).
Reported per point: the median step time, examples per second and the weak-scaling efficiency
``t(1) / t(n)`` (1.0: perfect; the global batch grows with ``n``, so a constant step time is
ideal).

On forced CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``) the devices share
the same cores, so the figures show that the path works, not a speed-up; on a GPU or TPU host they
are the scaling figure.

    .venv/bin/python benchmarks/data_parallel.py [--per-device-batch 128] [--repeats 10]
        [--quick] [--json PATH]

``--quick``: per-device batch 8 and 2 rounds.
"""
from __future__ import annotations

import jax
from common import (IMAGE_SHAPES, interleaved_ms, machine, markdown_table, parser, random_batch,
                    report, train_state)

from pfa_jax import train
from pfa_jax.app.placement import Placement

MODELS = ("ffn2", "resnet20")
RULES = ("bp", "pfa")


def counts() -> list[int]:
    """1, 2, 4, ... up to the device count, and the device count itself."""
    total, n, out = jax.device_count(), 1, []
    while n < total:
        out.append(n)
        n *= 2
    return out + [total]


def variant(model_name: str, rule: str, devices: int, per_device: int):
    """One data-parallel step of ``model_name`` with ``rule`` on the first ``devices`` devices."""
    where = Placement.create(devices)
    batch = random_batch((devices * per_device,) + IMAGE_SHAPES[model_name])
    state = where.whole(train_state(model_name, rule, batch))
    batch = where.batch(jax.device_get(batch), devices * per_device)
    step = jax.jit(train.train_step)
    return lambda: step(state, batch)


def run(per_device: int, repeats: int) -> dict:
    results = {}
    for model_name in MODELS:
        for rule in RULES:
            variants = {n: variant(model_name, rule, n, per_device) for n in counts()}
            times = interleaved_ms(variants, repeats)
            base = times[1]["median_ms"]
            results[f"{model_name}/{rule}"] = {str(n): {
                **t, "examples_per_s": round(1000 * n * per_device / t["median_ms"], 1),
                "efficiency": round(base / t["median_ms"], 4)} for n, t in times.items()}
    return results


def main() -> None:
    args = parser(__doc__, repeats=10)
    args.add_argument("--per-device-batch", type=int, default=128)
    args = args.parse_args()
    per_device, repeats = (8, 2) if args.quick else (args.per_device_batch, args.repeats)
    results = run(per_device, repeats)
    payload = {"benchmark": "data_parallel", "per_device_batch": per_device, "repeats": repeats,
               "machine": machine(), "results": results}
    rows = [[name, n, r["median_ms"], r["examples_per_s"], r["efficiency"]]
            for name, points in results.items() for n, r in points.items()]
    report(payload, {f"weak scaling, per-device batch {per_device}": markdown_table(
        ["model/rule", "devices", "step ms", "examples/s", "t(1)/t(n)"], rows)}, args.json)


if __name__ == "__main__":
    main()
