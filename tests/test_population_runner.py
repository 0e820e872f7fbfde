"""The experiment runner's populations (``--population``): runs that differ only in seed and the
optimizer's scalars train as one program and write run directories equal to the single runs' (same
files, same values to float32 rounding; only wall times differ); a member that diverges is recorded
as diverged while the others finish; specs that differ in more are refused."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runs

from experiments import run as runner
from experiments.configs import common
from pfa_jax import population
from pfa_jax.app import checkpoint, population_run, spec

TIMES = ("epoch_time", "wall_time")


def _arguments(fashion_dir, out, only="kp-seed[01]"):
    sets = runs.TINY + [f"data_dir={fashion_dir}", "sharpness.examples=0", "robustness.examples=0",
                   "devices=1"]  # the tests see 4 CPU devices; a population trains on one
    return ["fig2_fashion_mnist", "--out", str(out), "--quiet", "--only", only,
            *[a for s in sets for a in ("--set", s)]]


def _files(run_dir):
    """The run directory's files, without TensorBoard's and orbax's chunk files (named at random,
    their number varying with the write; the arrays are compared instead)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if p.is_file() and "tensorboard" not in p.parts and p.parent.name != "d")


def _close(a, b):
    """Equal JSON values, numbers to float32 rounding, wall times left out."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            if k not in TIMES:
                _close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    else:
        assert a == b


def _same_run_directories(tmp_path, names):
    """The runs ``names`` written alike under ``single`` and ``pop``: same files, same config, the
    metrics, summary and checkpoints equal to float32 rounding."""
    for name in names:
        single, pooled = (tmp_path / kind / "fig2_fashion_mnist" / name for kind in ("single", "pop"))
        assert _files(pooled) == _files(single)
        assert (pooled / "config.json").read_text() == (single / "config.json").read_text()
        _close(*[[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
                 for d in (pooled, single)])
        _close(*[json.loads((d / "summary.json").read_text()) for d in (pooled, single)])
        assert list((pooled / "tensorboard").iterdir())
        for epoch in (1, 2):
            arrays = [{k: v for k, v in checkpoint.Checkpoints(d / "checkpoints")._read(
                epoch, None).items() if k != "integrity"} for d in (pooled, single)]
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         *arrays)


def test_a_population_writes_the_single_runs_directories(fashion_dir, tmp_path, capsys):
    assert runner.main(_arguments(fashion_dir, tmp_path / "single")) == 0
    assert runner.main([*_arguments(fashion_dir, tmp_path / "pop"), "--population"]) == 0
    assert "2 of 2 runs to train (0 finished before); 2 of them in 1 population(s)" in (
        capsys.readouterr().out)
    _same_run_directories(tmp_path, ["kp-seed0", "kp-seed1"])
    invocation = json.loads((tmp_path / "pop" / "fig2_fashion_mnist" / "experiment.json")
                            .read_text())["invocations"][0]
    assert invocation["population"] is True


def test_runs_that_differ_in_optimizer_scalars_are_one_population(fashion_dir, tmp_path, capsys,
                                                                  monkeypatch):
    """A sweep over the learning rate (one value per schedule segment), weight decay and momentum,
    two seeds: all four runs one population, each equal to its single run."""
    values = [("a", {"optimizer.learning_rate": (0.02, 0.01)}),
              ("b", {"optimizer.learning_rate": (0.05, 0.001), "optimizer.weight_decay": 1e-3,
                     "optimizer.momentum": 0.5})]
    monkeypatch.setattr(runner.configs.load("fig2_fashion_mnist"), "runs", lambda: common.sweep(
        "fig2", seeds=(0, 1), rules=["kp"], opt=values))
    names = [f"kp-{o}-seed{s}" for o in "ab" for s in (0, 1)]
    milestone = ["--set", "optimizer.lr_milestones=(1,)"]
    assert runner.main([*_arguments(fashion_dir, tmp_path / "single", only="kp-*"), *milestone]) == 0
    assert runner.main([*_arguments(fashion_dir, tmp_path / "pop", only="kp-*"), *milestone,
                        "--population"]) == 0
    assert "4 of 4 runs to train (0 finished before); 4 of them in 1 population(s)" in (
        capsys.readouterr().out)
    _same_run_directories(tmp_path, names)
    rates = [json.loads((tmp_path / "pop" / "fig2_fashion_mnist" / n / "metrics.jsonl")
                        .read_text().splitlines()[-1])["learning_rate"] for n in names]
    np.testing.assert_allclose(rates, [0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_a_diverging_member_is_recorded_and_the_others_finish(fashion_dir, tmp_path, capsys,
                                                             monkeypatch):
    """Member 1's parameters turned NaN after its first epoch (as a diverging member's become):
    it gets diverged.json and nothing else, as a diverged single run; member 0 finishes and equals
    its single run."""
    train_epoch = population.train_epoch

    def member_one_diverges(pop, *args, **kwargs):
        pop, steps = train_epoch(pop, *args, **kwargs)
        params = jax.tree.map(lambda p: p.at[1].set(jnp.nan), pop.state.params)
        return pop.replace(state=pop.state.replace(params=params)), steps

    monkeypatch.setattr(population, "train_epoch", member_one_diverges)
    assert runner.main([*_arguments(fashion_dir, tmp_path / "pop"), "--population"]) == 0
    out = capsys.readouterr().out
    assert "fig2_fashion_mnist/kp-seed1: diverged: training diverged in epoch 1 at step 8 " \
           "(the parameters)" in out
    exp = tmp_path / "pop" / "fig2_fashion_mnist"
    assert _files(exp / "kp-seed1") == ["diverged.json"]
    assert json.loads((exp / "kp-seed0" / "summary.json").read_text())["epoch"] == 2
    monkeypatch.setattr(population, "train_epoch", train_epoch)
    assert runner.main(_arguments(fashion_dir, tmp_path / "single", only="kp-seed0")) == 0
    _close(*[json.loads((d / "kp-seed0" / "summary.json").read_text())
             for d in (exp, tmp_path / "single" / "fig2_fashion_mnist")])


def test_members_must_differ_only_in_seed_and_optimizer_scalars(fashion_dir, tmp_path):
    configs = [runner.run_config("fig2_fashion_mnist", run, runs.TINY + [f"data_dir={fashion_dir}"])
               for run in runner.configs.load("fig2_fashion_mnist").runs()
               if run.name in ("kp-seed0", "fa-seed1")]
    with pytest.raises(ValueError, match=r"population: run 1 differs from run 0 in more than seed, "
                                         r"rule.options.rho, optimizer.learning_rate, .*, "
                                         r"optimizer.eps: "
                                         r"rule.name: 'fa' -> 'kp'"):
        population_run.run([spec.resolve(c) for c in configs],
                           [tmp_path / "a", tmp_path / "b"], progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
