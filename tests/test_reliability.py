"""Reliability: config validation, the divergence guard, crash safety (SIGKILL, corrupted
checkpoints) and determinism of the ``pfa-jax train`` command."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_data import make_fashion_dir

from pfa_jax import models
from pfa_jax.app import cli, config as config_lib, data, experiment, spec


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    return make_fashion_dir(tmp_path_factory.mktemp("fashion"), 2048, 200)


def args(fashion_dir, out, *extra):
    return ["train", "--model", "ffn2", "--rule", "kp", "--epochs", "2", "--batch-size", "64",
            "--quiet", "--set", f"data_dir={fashion_dir}", "--set", "model_options.widths=(32,)",
            "--set", "metrics_batch_size=64", "--out", str(out), *extra]


def records(out):
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_time"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("assignments, message", [
    (["model='vgg'"], "model='vgg' is unknown; valid: ffn2"),
    (["rule.name='nope'"], "name='nope' is unknown; valid: bp, fa"),
    (["dataset='imagenet'"], "dataset='imagenet' is unknown; valid: fashion_mnist"),
    (["rule.name='pfa'", "rule.options.expansion=0.5"], "expansion=0.5 must be a finite number >= 1"),
    (["rule.name='pfa'", "rule.options.density=0.0"], "density=0.0 must be a finite number in (0, 1]"),
    (["rule.name='pfa'", "rule.options.density=1.5"], "density=1.5 must be a finite number in (0, 1]"),
    (["rule.name='fa'", "rule.options.rho=1.5"], "rho=1.5 must lie in [-1, 1]"),
    (["rule.name='fa'", "rule.options.expansion=3"], "no option(s) ['expansion']"),
    (["rule.layers={'output': 'nope'}"], "unknown rule 'nope'"),
    (["batch_size=0"], "batch_size=0 must be an int >= 1"),
    (["epochs=-1"], "epochs=-1 must be an int >= 1"),
    (["epochs=2.5"], "epochs=2.5 must be an int >= 1"),
    (["noise_pretrain_steps=-5"], "noise_pretrain_steps=-5 must be an int >= 0"),
    (["augment='mixup'"], "augment='mixup' is unknown; valid: none, crop_flip"),
    (["image_size=64"], "image_size=64 applies to streamed datasets (imagenet2012) only"),
    (["dataset='imagenet2012'", "holdout=5000"], "holdout=5000 is for in-memory datasets"),
    (["dataset='imagenet2012'", "augment='crop_flip'"], "augment='crop_flip' is for in-memory"),
    (["optimizer.lr_milestones=(3,)"], "lr_milestones=(3,) has milestone(s) [3] at or beyond epochs=3"),
    (["optimizer.weight_decay=(0.1, 0.0)", "optimizer.wd_milestones=(0,)"], "wd_milestones=(0,)"),
    (["optimizer.name='lamb'"], "name='lamb' is unknown"),
    (["model_options.depth=3"], "no option(s) ['depth']"),
])
def test_config_validation_names_key_value_and_choices(assignments, message):
    config = config_lib.override(config_lib.default_config(), assignments)
    with pytest.raises(ValueError) as error:
        spec.resolve(config)
    assert message in str(error.value)


def test_a_model_that_does_not_fit_the_images_is_reported():
    images = np.zeros((2, 6, 6, 1), np.float32)
    tiny = data.Dataset("tiny", images, np.zeros(2, np.int32), images, np.zeros(2, np.int32), 10,
                        (0.0,), (1.0,))
    with pytest.raises(ValueError, match=r"model='lenet' does not fit tiny images of shape \(6, 6, 1\)"):
        experiment.check_fits(models.get("lenet"), "lenet", tiny)


def test_divergence_stops_with_epoch_and_step_and_keeps_the_good_checkpoint(fashion_dir, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    argv = args(fashion_dir, out, "--epochs", "3", "--set", "optimizer.learning_rate=(0.01, 1e12, 0.01)",
                "--set", "optimizer.lr_milestones=(1, 2)")
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "diverged in epoch 2 at step" in error and "after epoch 1" in error
    assert len(records(out)) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(fashion_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli.main(args(fashion_dir, straight, "--epochs", "6")) == 0
    process = subprocess.Popen([sys.executable, "-m", "pfa_jax.app.cli",
                                *args(fashion_dir, killed, "--epochs", "6")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while (not log.exists() or len(log.read_text().splitlines()) < 2) and process.poll() is None:
        assert time.monotonic() < deadline, "the subprocess never finished an epoch"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(records(killed)) < 6, "the run finished before it could be killed"
    assert cli.main(["train", "--resume", "--out", str(killed), "--quiet"]) == 0
    assert records(killed) == records(straight)


def test_a_corrupted_checkpoint_is_reported_not_replaced(fashion_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(fashion_dir, out)) == 0
    newest = out / "checkpoints" / "2"
    for path in newest.rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert newest.exists() and len(records(out)) == 2


def test_same_seed_same_metrics_other_seed_other_metrics(fashion_dir, tmp_path):
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        assert cli.main(args(fashion_dir, tmp_path / name, "--rule", "brsf", "--seed", str(seed))) == 0
        runs[name] = records(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def _snapshot(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_failed_resume_or_bad_override_leaves_the_run_directory_as_it_was(fashion_dir, tmp_path,
                                                                            capsys):
    out = tmp_path / "run"
    assert cli.main(args(fashion_dir, out)) == 0
    before = _snapshot(out)
    for extra, message in [(["--epochs", "1"], "fewer than the 2 epochs"),
                           (["--rule", "pfa"], "cannot be read"),
                           (["--set", "rule.name=nope"], "unknown"),
                           (["--set", "rule_options.rho=0.5"], "is now 'rule.options.rho'")]:
        assert cli.main(["train", "--resume", "--out", str(out), "--quiet", *extra]) == 2
        assert message in capsys.readouterr().err
        assert _snapshot(out) == before, extra
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"]) == 0
