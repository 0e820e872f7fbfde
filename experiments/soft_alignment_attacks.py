"""Attacks that cannot be masked, on the finished runs of a soft-alignment experiment: each run's
newest checkpoint attacked with its own true gradients (FGSM, and PGD with ``--pgd-steps`` steps,
checked for convergence against twice the steps) and with a transfer attack whose perturbations
come from an independently trained bp model (``bp-seed{(s + 1) % seeds}``, so bp's own runs are
attacked by another bp seed too), on the first ``--examples`` test images, radii in pixel units.

    python -m experiments.soft_alignment_attacks                      # soft_alignment_seeds
    python -m experiments.soft_alignment_attacks --experiment NAME --examples 500

Writes ``attacks.json`` into each run directory (the report reads it); a run that already has one
is skipped. The epsilons are the experiment's ``robustness.adversarial_epsilons``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

from experiments import configs
from pfa_jax import metrics
from pfa_jax.app import closing, finished, writers

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRANSFER_SOURCE = "bp"


def _batches(dataset, examples: int, batch_size: int = 500) -> list[dict]:
    images, labels = dataset.test_images[:examples], dataset.test_labels[:examples]
    return [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}
            for i in range(0, len(labels), batch_size)]


def attacks(run, source, epsilons, examples: int, pgd_steps: int) -> dict:
    """Own-gradient FGSM and PGD (with its convergence check) and transfer FGSM and PGD from
    ``source`` (a restored bp run), each at every epsilon."""
    batches, pixels = _batches(run.dataset, examples), closing.pixel_units(run.dataset)
    key = jax.random.key(17)

    def robust(attack, **options):
        return metrics.adversarial(run.state, batches, epsilons, attack, key, steps=pgd_steps,
                                   **pixels, **options)

    own = {attack: robust(attack) for attack in ("fgsm", "pgd")}
    transfer = {attack: robust(attack, source=source.state) for attack in ("fgsm", "pgd")}
    return {"epsilons": list(epsilons), "examples": sum(len(b["label"]) for b in batches),
            "clean_accuracy": own["fgsm"]["clean_accuracy"], "pgd_steps": pgd_steps,
            "own": {a: r["robust_accuracy"] for a, r in own.items()},
            "transfer": {a: r["robust_accuracy"] for a, r in transfer.items()},
            "convergence": [metrics.attack_convergence(run.state, batches, eps, pgd_steps, key,
                                                       **pixels) for eps in epsilons]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.soft_alignment_attacks",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="soft_alignment_seeds")
    parser.add_argument("--results", type=pathlib.Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--pgd-steps", type=int, default=50)
    args = parser.parse_args(argv)
    module = configs.load(args.experiment)
    runs = module.runs()
    seeds = sorted({run.labels["seed"] for run in runs})
    exp_dir = args.results / args.experiment
    epsilons = tuple(module.get_config().robustness.adversarial_epsilons)
    sources = {}
    for run in runs:
        run_dir = exp_dir / run.name
        if not (run_dir / "summary.json").exists() or (run_dir / "attacks.json").exists():
            continue
        seed = run.labels["seed"]
        source_seed = seeds[(seeds.index(seed) + 1) % len(seeds)]
        source_name = f"{TRANSFER_SOURCE}-seed{source_seed}"
        if not (exp_dir / source_name / "summary.json").exists():
            print(f"{run.name}: skipped, its transfer source {source_name} has not finished")
            continue
        if source_name not in sources:
            sources[source_name] = finished.load(exp_dir / source_name)
        started = time.time()
        result = {"transfer_source": source_name,
                  **attacks(finished.load(run_dir), sources[source_name], epsilons,
                            args.examples, args.pgd_steps)}
        result["wall_time"] = time.time() - started
        writers.write_whole(run_dir / "attacks.json", json.dumps(result, indent=1) + "\n")
        print(f"{run.name}: own PGD {result['own']['pgd']}, transfer PGD "
              f"{result['transfer']['pgd']} ({result['wall_time']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
