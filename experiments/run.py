"""Runs experiments' sweeps into run directories (``experiments/configs`` describes the configs).

    python -m experiments.run fig2_fashion_mnist                 # 30 runs, one after another
    python -m experiments.run soft_alignment_mlp --only 'fa*' --set epochs=5 --out /tmp/results
    python -m experiments.run fig2_fashion_mnist expansion_fashion_mnist --workers 8   # a GPU
    python -m experiments.run fig2_fashion_mnist --population    # seeds as one program each
    python -m experiments.run fig2_fashion_mnist --list          # the runs and their state
    python -m experiments.run --list                             # every experiment

Each run of experiment ``E`` writes ``OUT/E/RUN/`` (``pfa_jax.app.experiment``: ``config.json``,
``metrics.jsonl``, ``checkpoints/``, ``curves.png``, ``summary.json``). Running again is safe and
picks up where it stopped: finished runs (with ``summary.json``) are skipped, interrupted ones resume
from their newest checkpoint and end with the same metrics as an uninterrupted run. A run whose
training diverges gets ``diverged.json`` (the error, and its ``diagnosis``: the epoch and step,
without the machine's paths) and the sweep goes on. ``OUT/E/experiment.json``
records the runs, their labels, the hardware and each invocation's wall time (updated every
minute, so a killed invocation's is short by at most that). A run that another
experiment shares (``common.Run.source``: the same config, checked before anything trains) lives in
that experiment's directory: listed, trained if missing, and reported from there.

``--population`` trains the new runs that differ only in ``seed``, the soft alignment ``rho`` and
the optimizer's scalars (learning rate, weight decay, momentum, ...) as one population each
(``pfa_jax.app.population_run``; the repository's ``docs/populations.md``), writing every run
directory as its single run would.

Every run's config is validated before the first one starts. ``--workers N`` runs N runs at once in
separate processes (useful on a GPU, which small models leave mostly idle); GPU memory is then
allocated on demand (``XLA_PYTHON_CLIENT_PREALLOCATE=false``). Each run trains on every device
(``devices`` in its config; ``--set devices=1`` with several workers on a multi-GPU host gives each
run one). On several hosts run the same command on each (``--distributed`` or ``--coordinator``,
``--num-processes``, ``--process-id``, as for ``pfa-jax train``, see ``pfa_jax.app.placement``):
every run then trains on all processes' devices, and only process 0 writes ``experiment.json``.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX starts: shared GPUs

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import datetime  # noqa: E402
import fnmatch  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from etils import epath  # noqa: E402

from experiments import configs  # noqa: E402
from experiments.configs import common  # noqa: E402
from pfa_jax.app import config as config_lib  # noqa: E402
from pfa_jax.app import experiment, placement, population_run, rundir, spec, writers  # noqa: E402

DEFAULT_OUT = epath.Path(__file__).parent / "results"


def run_config(name: str, run: common.Run, assignments=()) -> ml_collections.ConfigDict:
    """The resolved config of one run: the experiment's base, the run's values, then overrides."""
    config = configs.load(name).get_config()
    for key, value in run.overrides.items():
        config_lib.set_value(config, key, value)
    return config_lib.override(config, assignments)


def run_dir(out: epath.Path, name: str, run: common.Run) -> epath.Path:
    """Where ``run`` of experiment ``name`` is stored under the results directory ``out``: its
    own directory, or its source's (``Run.source``)."""
    return out / (run.source or f"{name}/{run.name}")


def check_source(name: str, run: common.Run, config: ml_collections.ConfigDict,
                 assignments=()) -> None:
    """Raises ``ValueError`` unless ``run.source`` names a run of another experiment whose config
    (with the same ``assignments``) is ``config``."""
    experiment_name, _, source_name = run.source.partition("/")
    source = next((r for r in configs.load(experiment_name).runs() if r.name == source_name), None)
    if source is None or source.source:
        raise ValueError(f"{name}/{run.name}: source {run.source!r} is not a run of its own of "
                         f"experiment {experiment_name!r}")
    differ = common.differences(config, run_config(experiment_name, source, assignments))
    if differ:
        raise ValueError(f"{name}/{run.name}: its config differs from its source "
                         f"{run.source}'s at {sorted(differ)}")


def state(run_dir: epath.Path) -> str:
    """``done``, ``diverged``, ``partial`` (checkpointed, will resume) or ``new``."""
    if (run_dir / "summary.json").exists():
        return "done"
    if (run_dir / "diverged.json").exists():
        return "diverged"
    if any((run_dir / "checkpoints").glob("*")):
        return "partial"
    return "new"


def hardware() -> dict:
    """What the runs ran on, with the ``XLA_FLAGS`` they ran under (they can change speed and
    float rounding)."""
    device = jax.devices()[0]
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as lines:
            cpu = next((line.split(":", 1)[1].strip() for line in lines
                        if line.startswith("model name")), cpu)
    return {"platform": device.platform, "device": device.device_kind,
            "devices": jax.device_count(), "cpu": cpu, "cpu_cores": os.cpu_count(),
            "jax": jax.__version__, "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def train_one(config_json: str, run_dir: str, progress: bool) -> dict:
    """Trains (or resumes) one run; returns its summary, ``{'diverged': message}``, or
    ``{'busy': message}`` when another process is training it (it is left to that one)."""
    run_dir = epath.Path(run_dir)
    config = config_lib.from_json(config_json)
    resume = state(run_dir) == "partial"
    try:
        return experiment.train_and_evaluate(spec.resolve(config), run_dir, overwrite=not resume,
                                             progress=progress, resume=resume)
    except rundir.RunDirectoryBusyError as error:
        return {"busy": str(error)}
    except experiment.DivergenceError as error:
        return _diverged(run_dir, error)


def _diverged(run_dir: epath.Path, error: experiment.DivergenceError) -> dict:
    """Writes ``diverged.json`` (a new run that diverged before its first checkpoint left
    nothing, so the directory may have to be made again)."""
    if placement.writer():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "diverged.json").write_text(json.dumps(
            {"error": str(error), "diagnosis": error.diagnosis}, indent=2) + "\n")
    return {"diverged": str(error)}


def train_group(config_jsons: list[str], run_dirs: list[str], progress: bool) -> list[dict]:
    """Trains one job: a single run (``train_one``), or new runs of one ``population_run.group`` as
    one population (``pfa_jax.app.population_run``); returns each run's outcome as ``train_one``
    does."""
    if len(config_jsons) == 1:
        return [train_one(config_jsons[0], run_dirs[0], progress)]
    specs = [spec.resolve(config_lib.from_json(text)) for text in config_jsons]
    try:
        outcomes = population_run.run(specs, run_dirs, progress)
    except rundir.RunDirectoryBusyError:  # another process holds a member: train them one by one
        return [train_one(text, path, progress) for text, path in zip(config_jsons, run_dirs)]
    return [_diverged(epath.Path(path), outcome)
            if isinstance(outcome, experiment.DivergenceError) else outcome
            for path, outcome in zip(run_dirs, outcomes)]


def populations(todo: list, out: epath.Path) -> list[list]:
    """``todo``'s runs as jobs: the new runs of one ``population_run.group`` (differing only in
    ``seed``, ``rho`` and the optimizer's scalars, and that ``population_run.refusal`` accepts) one
    job each group, every other run a job of its own."""
    groups: dict[str, list] = {}
    for job in todo:
        name, run, config = job
        key = None
        if state(run_dir(out, name, run)) == "new":
            resolved = spec.resolve(config)
            key = None if population_run.refusal(resolved) else population_run.group(resolved)
        groups.setdefault(key or f"single {len(groups)}", []).append(job)
    return list(groups.values())


def _record_invocation(exp_dir: epath.Path, name: str, started: float, info: dict) -> None:
    """Writes this invocation into ``experiment.json``, which lists the whole sweep (all runs,
    whether this invocation trained them or not) and every invocation: this one's entry (found by
    ``info['id']``, added the first time) gets its hardware and its wall time so far. Written
    whole (``writers.write_whole``), so a kill never leaves the file cut; invocations side by
    side each update their own entry. Only process 0 of a multi-process invocation writes it."""
    if not placement.writer():
        return
    exp_dir.mkdir(parents=True, exist_ok=True)
    path = exp_dir / "experiment.json"
    record = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    module = configs.load(name)
    record.update({"name": name, "description": module.__doc__.strip(),
                   "runs": [{"name": r.name, "labels": r.labels,
                             **({"source": r.source} if r.source else {})}
                            for r in module.runs()]})
    invocation = {**info, "updated": datetime.datetime.now().isoformat(timespec="seconds"),
                  "wall_time": time.time() - started}
    entries = record["invocations"]
    mine = next((k for k, entry in enumerate(entries) if entry.get("id") == info["id"]),
                len(entries))
    entries[mine:mine + 1] = [invocation]
    writers.write_whole(path, json.dumps(record, indent=2) + "\n", f".{info['id']}.partial")


def _keep_recording(record, every: float = 60.0) -> threading.Event:
    """Calls ``record()`` every ``every`` seconds in a daemon thread until the returned event is
    set, so an invocation that is killed (or loses its machine) leaves its wall time to within
    ``every`` seconds, not only up to its last finished run."""
    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            record()

    threading.Thread(target=beat, name="pfa_jax-record-invocation", daemon=True).start()
    return stop


def _follow_parent(parent: int, every: float = 1.0) -> None:
    """In a worker: exit as soon as the invocation that started it is gone (killed, or stopped by
    a signal that reached it alone), instead of training on unseen beside a later invocation
    writing the same run directory. The run stops as if killed; its checkpoints are intact."""
    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="pfa_jax-follow-parent", daemon=True).start()


def _train_all(jobs: list[list], out: epath.Path, workers: int, progress: bool):
    """Yields ``((experiment, run), summary)`` as runs finish (``jobs``: lists of runs, each list
    trained by one ``train_group``): in this process with one worker, else in ``workers`` spawned
    processes."""
    def arguments(job):
        return ([config.to_json() for _, _, config in job],
                [str(run_dir(out, name, run)) for name, run, _ in job])

    if workers == 1:
        for job in jobs:
            for (name, run, _), summary in zip(job, train_group(*arguments(job), progress)):
                yield (name, run), summary
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_follow_parent,
                                                initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(train_group, *arguments(job), False): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            for (name, run, _), summary in zip(futures[future], future.result()):
                yield (name, run), summary


def _cost(config: ml_collections.ConfigDict) -> float:
    """A rough relative cost, to start the longest runs first."""
    return config.epochs * (50 if config.model.startswith("resnet") else 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                        help=f"one or more of: {', '.join(configs.names())} (none with --list: "
                             "list them all)")
    parser.add_argument("--out", type=epath.Path, default=DEFAULT_OUT,
                        help="results directory (default experiments/results)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every run, e.g. epochs=5")
    parser.add_argument("--only", default="*", metavar="GLOB", help="runs whose name matches")
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once")
    parser.add_argument("--list", action="store_true", help="list the runs and their state")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch output")
    parser.add_argument("--population", action="store_true",
                        help="train the new runs that differ only in seed, rho and optimizer scalars as "
                             "one population each "
                             "(one compiled program; every run directory as a single run's)")
    placement.add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.experiments:
        if not args.list:
            parser.error("name one or more experiments, or --list to see them all")
        for name in configs.names():
            module = configs.load(name)
            summary = " ".join(module.__doc__.strip().split("\n\n")[0].split())
            print(f"{name} ({len(module.runs())} runs): {textwrap.shorten(summary, 110)}")
        return 0
    try:
        if args.workers < 1:
            raise ValueError(f"--workers={args.workers} must be >= 1")
        placement.from_arguments(args)
        if args.workers > 1 and jax.process_count() > 1:
            raise ValueError(f"--workers={args.workers} runs runs side by side in one process "
                             "each; a multi-process invocation trains one run at a time on all "
                             "processes: use --workers 1")
        sweeps = {name: [r for r in configs.load(name).runs() if fnmatch.fnmatch(r.name, args.only)]
                  for name in args.experiments}
        if not any(sweeps.values()):
            names = [r.name for name in sweeps for r in configs.load(name).runs()]
            raise ValueError(f"--only {args.only!r} matches no run of {', '.join(sweeps)}; "
                             "their runs: " + textwrap.shorten(", ".join(names), 300))
        jobs = []
        for name, runs in sweeps.items():
            for run in runs:
                config = run_config(name, run, args.set)
                spec.resolve(config)
                if run.source:
                    check_source(name, run, config, args.set)
                jobs.append((name, run, config))
    except ValueError as error:
        print(f"experiments.run: error: {error}", file=sys.stderr)
        return 2
    for name, run, _ in jobs:
        if args.list:
            print(f"{name}/{run.name}: {state(run_dir(args.out, name, run))}"
                  + (f" (stored as {run.source})" if run.source else ""))
    if args.list:
        return 0
    info = {"id": uuid.uuid4().hex[:12],
            "started": datetime.datetime.now().isoformat(timespec="seconds"), **hardware(),
            "workers": args.workers, "population": args.population, "overrides": args.set}
    started = time.time()
    stored = {}  # run directory -> its first job: a run shared by two sweeps trains once
    for name, run, config in jobs:
        stored.setdefault(run_dir(args.out, name, run), (name, run, config))
    todo = sorted([job for path, job in stored.items() if state(path) in ("new", "partial")],
                  key=lambda job: -_cost(job[2]))
    groups = populations(todo, args.out) if args.population else [[job] for job in todo]
    pooled = [group for group in groups if len(group) > 1]
    print(f"{len(todo)} of {len(stored)} runs to train ({len(stored) - len(todo)} finished before)"
          + (f"; {sum(map(len, pooled))} of them in {len(pooled)} population(s)"
             if args.population else ""))
    placement.barrier("experiments.run: runs listed")  # before process 0 writes into any of them
    lock = threading.Lock()

    def record():
        with lock:
            for name in sweeps:
                _record_invocation(args.out / name, name, started, info)

    record()
    stop = _keep_recording(record)
    try:
        for (name, run), summary in _train_all(groups, args.out, args.workers, not args.quiet):
            outcome = (f"diverged: {summary['diverged']}" if "diverged" in summary else
                       f"skipped: {summary['busy']}" if "busy" in summary else
                       f"test accuracy {100 * summary['test_accuracy']:.2f}% "
                       f"({summary['wall_time']:.0f} s)")
            print(f"{name}/{run.name}: {outcome}", flush=True)
    finally:
        stop.set()
        record()
    return 0


if __name__ == "__main__":
    sys.exit(main())
