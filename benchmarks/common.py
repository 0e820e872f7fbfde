"""What the benchmarks share: interleaved timing, train states on random batches, machine facts,
and output (JSON on stdout, optionally ``--json PATH``, then markdown tables).

Timing is interleaved: every variant is compiled and warmed up first, then the variants are run
round-robin (``a, b, c, a, b, c, ...``) and each one's median is taken, so that load from other
processes on a shared machine falls on all variants alike. Every benchmark runs on
``jax.devices()[0]`` (CPU, GPU or TPU) and blocks on results with ``jax.block_until_ready``.

Import from a benchmark script (``benchmarks/`` is on ``sys.path`` when a script there runs):
``from common import ...``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import pfa_jax as pj


# -- timing ----------------------------------------------------------------------------------------
def call_ms(fn: Callable[[], Any]) -> float:
    """Milliseconds of one ``fn()``, waiting for its results."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return 1000 * (time.perf_counter() - start)


def interleaved_ms(variants: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 2
                   ) -> dict[str, dict[str, float]]:
    """Per-variant ``median_ms``, ``min_ms``, ``q1_ms``, ``q3_ms`` and ``compile_ms`` (the first call)
    of ``repeats`` round-robin rounds over the zero-argument callables in ``variants``, after
    ``warmup`` calls of each (the first one compiles)."""
    first = {}
    for name, fn in variants.items():
        first[name] = call_ms(fn)
        for _ in range(warmup - 1):
            call_ms(fn)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(call_ms(fn))
    return {name: summary(t, compile_ms=first[name]) for name, t in times.items()}


def summary(times: Sequence[float], **extra) -> dict[str, float]:
    """Median, min and quartiles of ``times`` (ms), rounded."""
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    out = {"median_ms": statistics.median(ordered), "min_ms": ordered[0], "q1_ms": q[0],
           "q3_ms": q[2], "n": len(ordered), **extra}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def median_ms(fn, args, repeats: int) -> float:
    """Median milliseconds of ``fn(*args)`` over ``repeats`` runs, after compiling and one warm-up."""
    return interleaved_ms({"fn": lambda: fn(*args)}, repeats)["fn"]["median_ms"]


# -- models and data -------------------------------------------------------------------------------
IMAGE_SHAPES = {"ffn2": (28, 28, 1), "lenet": (28, 28, 1), "resnet20": (32, 32, 3),
                "resnet56": (32, 32, 3), "resnet18": (224, 224, 3)}


def random_batch(shape: Sequence[int], seed: int = 0, classes: int = 10) -> dict:
    """``{'image': N(0, 1) of shape, 'label': uniform ints}`` on the default device."""
    images_key, labels_key = jax.random.split(jax.random.key(seed))
    return {"image": jax.random.normal(images_key, tuple(shape), jnp.float32),
            "label": jax.random.randint(labels_key, tuple(shape[:1]), 0, classes)}


def train_state(model_name: str, rule, batch: dict, seed: int = 0, **model_options):
    """A fresh ``TrainState`` (SGD, momentum 0.9, lr 0.01, wd 1e-4) of ``model_name`` with ``rule``."""
    model = pj.models.get(model_name, rule=rule, **model_options)
    return pj.train.create_train_state(jax.random.key(seed), model, batch["image"][:1],
                                       {"learning_rate": 0.01, "weight_decay": 1e-4})


def step_variant(model_name: str, rule, batch: dict, **model_options) -> Callable[[], Any]:
    """A zero-argument callable running one jitted ``train_step`` (same state every call)."""
    state = train_state(model_name, rule, batch, **model_options)
    step = jax.jit(pj.train.train_step)
    return lambda: step(state, batch)


def rule_label(rule) -> str:
    return rule if isinstance(rule, str) else f"{rule.name}({getattr(rule, 'route', '')})"


# -- machine and output ----------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True
                                   ).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """Device, versions, ``XLA_FLAGS``, CPU, core count and the load average now."""
    device = jax.devices()[0]
    return {"device": str(device), "platform": device.platform,
            "device_kind": getattr(device, "device_kind", ""), "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", jax.__version__),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "date": datetime.date.today().isoformat(), "loadavg_start": list(os.getloadavg())}


def parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """Common options: ``--repeats``, ``--quick`` and ``--json PATH``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds per variant")
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats: a smoke check")
    p.add_argument("--json", metavar="PATH", help="also write the JSON results to PATH")
    return p


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(payload: dict, tables: Mapping[str, str], json_path: str | None = None) -> None:
    """Adds the end load average to ``payload['machine']``, prints it as JSON, then the tables."""
    payload["machine"]["loadavg_end"] = list(os.getloadavg())
    text = json.dumps(payload, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
    for title, table in tables.items():
        print(f"\n### {title}\n\n{table}")


def verdict(value: float, target: float | None) -> str:
    """``'pass'`` / ``'FAIL'`` against ``value <= target``, ``''`` without a target."""
    if target is None:
        return ""
    return "pass" if value <= target else "FAIL"
