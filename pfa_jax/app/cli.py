"""The ``pfa-jax`` command.

    pfa-jax train --rule pfa --model ffn2 --dataset fashion_mnist --epochs 3
    pfa-jax train --rule pfa --set rule.options.expansion=5 --set optimizer.weight_decay='(0.03, 9e-5)' \
        --set optimizer.wd_milestones='(1,)'
    pfa-jax train --resume --out runs/DIR --epochs 40     # continue from the newest checkpoint
    pfa-jax train --devices 1                             # one device (default: all of them)
    pfa-jax train --coordinator HOST0:1234 --num-processes 4 --process-id I   # on each of 4 hosts
    pfa-jax rules | models

Flags set the common keys of ``pfa_jax.app.config.default_config()``; ``--set key=value`` sets any key.
The repository's ``docs/command.md`` describes the command and its run directories,
``docs/scale.md`` several devices and hosts.
"""
from __future__ import annotations

import argparse
import copy
import sys

from pfa_jax import models, rules
from pfa_jax.app import config as config_lib
from pfa_jax.app import data, own_model, placement, text

__all__ = ["main"]

# flag -> (config key, type, what it sets)
_FLAGS = {"rule": ("rule.name", str, f"the learning rule, one of {', '.join(rules.names())}"),
          "model": ("model", str, f"the network, one of {', '.join(models.names())}, or an own "
                    "model's factory 'package.module:callable'"),
          "dataset": ("dataset", str, f"one of {', '.join(data.DATASETS + text.CORPORA)}"),
          "epochs": ("epochs", int, "training epochs (a positive int)"),
          "batch_size": ("batch_size", int, "training batch size (a positive int)"),
          "seed": ("seed", int, "seed of the initialisation, data order and noise (an int)"),
          "devices": ("devices", int, "devices to train on, the batch split over them: 0 for "
                                      "every device of every process, N for the first N")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfa-jax", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one model with one rule, write a run directory")
    defaults = config_lib.default_config()
    for name, (key, kind, words) in _FLAGS.items():
        train.add_argument("--" + name.replace("_", "-"), type=kind, dest=name,
                           help=f"{words}; sets {key} (default {config_lib.get(defaults, key)}, "
                                "or the run's own with --resume)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key (repeatable), e.g. optimizer.learning_rate=0.05 "
                            "or rule.options.expansion=5; values are Python literals, checked "
                            "against the default's type; keys: "
                            f"{', '.join(sorted(defaults.keys()))} (sections take dotted keys; "
                            "see pfa_jax.app.config)")
    train.add_argument("--out", help="run directory (default runs/DATASET-MODEL-RULE-seedN)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--resume", action="store_true",
                       help="continue the run directory --out from its newest checkpoint, with its "
                            "saved config (flags and --set change it, e.g. --epochs to train longer)")
    train.add_argument("--quiet", action="store_true", help="no progress output (default: bars "
                       "and one summary per epoch)")
    placement.add_arguments(train)
    commands.add_parser("rules", help="list the rules")
    commands.add_parser("models", help="list the models")
    return parser


def _check_same_run(saved, config, out) -> None:
    """``--resume`` continues the run's own rule and model: their arrays are in its checkpoints.
    (An unknown name is left to ``spec.resolve``, which lists the valid ones.)"""
    for key, names in (("rule.name", rules.names()), ("model", models.names())):
        own, given = config_lib.get(saved, key), config_lib.get(config, key)
        if given != own and (given in names or own_model.is_factory(str(given))):
            raise ValueError(f"{key}={given!r}: the run in {out} was trained with {key}={own!r}, "
                             "and --resume continues it (its checkpoints hold that one's arrays); "
                             "another rule or model needs a new run (another --out, or "
                             "--overwrite)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "rules":
        print("\n".join(rules.names()))
        return 0
    if args.command == "models":
        print("\n".join(models.names()))
        return 0
    from pfa_jax.app import experiment, resume, spec  # imports JAX-heavy modules only when training
    from pfa_jax.app.checkpoint import CheckpointError
    from pfa_jax.app.rundir import RunDirectoryBusyError

    flags = [f"{key}={getattr(args, name)}" for name, (key, _, _) in _FLAGS.items()
             if getattr(args, name) is not None]
    try:
        placement.from_arguments(args)
        if args.resume and not args.out:
            raise ValueError("--resume needs --out, the run directory to continue")
        config = resume.load_config(args.out) if args.resume else config_lib.default_config()
        saved = copy.deepcopy(config)
        config_lib.override(config, flags + args.set)
        if args.resume:
            _check_same_run(saved, config, args.out)
        out = args.out or (f"runs/{config.dataset}-{config.model.replace(':', '.')}-"
                            f"{config.rule.name}-seed{config.seed}")
        summary = experiment.train_and_evaluate(spec.resolve(config), out,
                                                overwrite=args.overwrite, progress=not args.quiet,
                                                resume=args.resume)
    except (ValueError, FileExistsError, FileNotFoundError, experiment.DivergenceError,
            CheckpointError, RunDirectoryBusyError) as error:
        print(f"pfa-jax: error: {error}", file=sys.stderr)
        return 2
    print(f"final test accuracy {100 * summary['test_accuracy']:.2f}%  (run directory: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
