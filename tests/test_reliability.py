"""Reliability: config validation, the divergence guard, crash safety (SIGKILL, corrupted
checkpoints) and determinism of the ``pfa-jax train`` command."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import optax
import pytest
from fashion_files import make_fashion_dir

import pfa_jax as pj
from pfa_jax import models
from pfa_jax.app import cli, data, experiment, spec
from pfa_jax.app import config as config_lib
from pfa_jax.app.checkpoint import CheckpointDamagedError, Checkpoints, crc32


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
    (["rule.name='nope'"], "rule.name='nope' is unknown; valid: bp, fa"),
    (["dataset='imagenet'"], "dataset='imagenet' is unknown; valid: fashion_mnist"),
    (["rule.name='pfa'", "rule.options.expansion=0.5"], "expansion=0.5 must be a finite number >= 1"),
    (["rule.name='pfa'", "rule.options.density=0.0"], "density=0.0 must be a finite number in (0, 1]"),
    (["rule.name='pfa'", "rule.options.density=1.5"], "density=1.5 must be a finite number in (0, 1]"),
    (["rule.name='fa'", "rule.options.rho=1.5"], "rho=1.5 must lie in [-1, 1]"),
    (["rule.name='fa'", "rule.options.expansion=3"], "no option(s) ['expansion']"),
    (["rule.name='dfa'", "rule.options.signal='label'"],
     "dfa: signal='label' is unknown; valid: ('error', 'sign', 'target')"),
    (["rule.name='dfa'", "rule.options.grid='middle'"],
     "dfa: grid='middle' is unknown; valid: ('input', 'output')"),
    (["rule.name='pfa'", "rule.options.form='G'", "rule.options.expansion=1"],
     "form='G' with expansion=1: C = Bp Bp^T is ill-conditioned"),
    (["rule.layers={'output': 'nope'}"], "unknown rule 'nope'"),
    (["batch_size=0"], "batch_size=0 must be an int >= 1"),
    (["epochs=-1"], "epochs=-1 must be an int >= 1"),
    (["epochs=2.5"], "epochs=2.5 must be an int (default 3)"),
    (["noise_pretrain_steps=-5"], "noise_pretrain_steps=-5 must be an int >= 0"),
    (["augment='mixup'"], "augment='mixup' is unknown; valid: none, crop_flip"),
    (["image_size=64"], "image_size=64 applies to streamed datasets (imagenet2012) only"),
    (["dataset='imagenet2012'", "holdout=5000"], "holdout=5000 is for in-memory datasets"),
    (["dataset='imagenet2012'", "augment='crop_flip'"], "augment='crop_flip' is for in-memory"),
    (["optimizer.lr_milestones=(3,)"], "lr_milestones=(3,) has milestone(s) [3] at or beyond epochs=3"),
    (["optimizer.weight_decay=(0.1, 0.0)", "optimizer.wd_milestones=(0,)"], "wd_milestones=(0,)"),
    (["optimizer.name='lamb'"], "name='lamb' is unknown"),
    (["model_options.depth=3"], "no option(s) ['depth']"),
    # every override is checked against its default's type, and named
    (["optimizer.learning_rate=abc"], "optimizer.learning_rate='abc' must be a number or a tuple"),
    (["limit=abc"], "limit='abc' must be an int (default 0); 'abc' is not a Python literal"),
    (["rule.name='fa'", "rule.options.rho=abc"], "rule.options: fa: rho='abc' must be a number or None"),
    (["rule.options=5"], "rule.options=5 must be a dict"),
    (["epochs.x=1"], "config key 'epochs' holds a value (3), not a section"),
    (["optimizer.momentum='abc'"], "optimizer.momentum='abc' must be a number (default 0.9)"),
    (["optimizer.weight_decay=(0.03, 9e-5"], "'(0.03, 9e-5' is not a Python literal ('(' was never closed)"),
    (["optimizer.lr_milestones=(1.5,)"], "lr_milestones=(1.5,) must be a tuple of ints"),
    (["robustness.attacks=('fgsm', 3)"], "attacks=('fgsm', 3) must be a tuple of strings"),
    (["sharpness.bar=1"], "unknown config key 'sharpness.bar'; valid keys of sharpness: ['enabled'"),
    (["dataset=3"], "dataset=3 must be a string"),
    (["epochs=True"], "epochs=True must be an int"),
    (["seed=-1"], "seed=-1 must be an int >= 0"),
    (["holdout=-5"], "holdout=-5 must be an int >= 0"),
    # every optimizer field is checked for range, and the message names the field
    (["optimizer.learning_rate=inf"], "optimizer.learning_rate=inf must be finite and non-negative"),
    (["optimizer.learning_rate=nan"], "optimizer.learning_rate=nan must be finite"),
    (["optimizer.momentum=-1"], "optimizer.momentum=-1.0 must be in [0, 1)"),
    (["optimizer.lr_decay=-5", "optimizer.lr_milestones=(1,)"],
     "optimizer.lr_decay=-5.0 must be a finite number > 0"),
    (["optimizer.eps=0"], "optimizer.eps=0.0 must be a finite number > 0"),
    (["optimizer.nesterov=1"], "optimizer.nesterov=1 must be True or False"),
    # model and rule options name themselves instead of "does not fit"
    (["model_options.widths=(0,)"], "model 'ffn2': widths=(0,) must be positive"),
    (["model_options.widths=(32, 'a')"], "model 'ffn2': widths=(32, 'a') must be a tuple of ints"),
    (["rule.name='dfa'", "rule.options.classes=3"], "dfa: classes=3 but the network has 10 outputs"),
])
def test_config_validation_names_key_value_and_choices(assignments, message):
    with pytest.raises(ValueError) as error:
        spec.resolve(config_lib.override(config_lib.default_config(), assignments))
    assert message in str(error.value)


def test_an_unknown_layer_in_rule_layers_is_named_as_such(fashion_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(fashion_dir, out, "--set", "rule.layers={'nope': 'bp'}")) == 2
    error = capsys.readouterr().err
    assert "config rule.layers: rule mapping names unknown layer(s) ['nope']" in error
    assert "does not fit" not in error and not out.exists()


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


def test_a_divergence_in_the_first_epoch_says_no_checkpoint_was_written(fashion_dir, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    assert cli.main(args(fashion_dir, out, "--set", "optimizer.learning_rate=1e12")) == 2
    error = capsys.readouterr().err
    assert "diverged in epoch 1" in error and "no checkpoint was written" in error
    assert "last good checkpoint" not in error


def _garble(path, size=64, at=0.5, seed=0):
    """``size`` random bytes written into ``path`` at the fraction ``at`` of its length, its size
    kept."""
    raw = bytearray(path.read_bytes())
    start = int(len(raw) * at)
    raw[start:start + size] = np.random.default_rng(seed).integers(0, 256, size, np.uint8).tobytes()
    path.write_bytes(bytes(raw))


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def two_epoch_run(fashion_dir, tmp_path_factory):
    """A finished two-epoch run and the records of the same run trained for three epochs."""
    root = tmp_path_factory.mktemp("runs")
    assert cli.main(args(fashion_dir, root / "three", "--epochs", "3")) == 0
    assert cli.main(args(fashion_dir, root / "two")) == 0
    return root / "two", records(root / "three")


def test_a_garbled_checkpoint_is_detected_and_the_run_resumes_from_the_newest_intact_one(
        two_epoch_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_epoch_run[0], out)
    _garble(_largest_file(out / "checkpoints" / "2"))
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"]) == 0
    error = capsys.readouterr().err
    # which check fires depends on where the bytes land (test_no_garbled_checkpoint_is_restored)
    assert re.search(r"checkpoints/2 (is damaged|cannot be read)", error)
    assert "Resuming from the checkpoint after epoch 1, the newest intact one" in error
    assert (out / "damaged-checkpoints" / "2").is_dir()
    assert records(out) == two_epoch_run[1]


def test_no_garbled_checkpoint_is_restored(tmp_path):
    """Bytes garbled anywhere in the largest file of a checkpoint (size kept): every restore
    raises, the storage library's own checks or the checksums naming the damaged arrays."""
    state = pj.train.create_train_state(jax.random.key(0), models.get("ffn2", widths=(32,)),
                                        np.zeros((1, 28, 28, 1), np.float32), {"name": "adam"})
    Checkpoints(tmp_path).save(1, state, ["{}"])
    largest = _largest_file(tmp_path / "1")
    intact = largest.read_bytes()
    checksummed = 0
    for i, at in enumerate(np.linspace(0.02, 0.98, 12)):
        _garble(largest, size=16, at=at, seed=i)
        with pytest.raises(CheckpointDamagedError) as error:
            Checkpoints(tmp_path).restore(1, state)
        checksummed += "differ from their checksums (params/hidden_0/kernel" in str(error.value)
        largest.write_bytes(intact)
    assert checksummed >= 6
    restored, records_crc, within, config = Checkpoints(tmp_path).restore(1, state)
    assert config is None  # saved without one
    assert within is None  # an epoch-end checkpoint
    chex.assert_trees_all_equal(restored.params, state.params)
    assert list(records_crc) == [crc32("{}")]


def test_unreadable_checkpoints_give_one_clear_error_and_change_nothing(two_epoch_run, tmp_path,
                                                                        capsys):
    out = tmp_path / "run"
    shutil.copytree(two_epoch_run[0], out)
    for path in (out / "checkpoints").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = _snapshot(out)
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("pfa-jax: error: no intact checkpoint") and error.count("\n") == 1
    assert "checkpoints/2 cannot be read" in error and "checkpoints/1 cannot be read" in error
    assert "tensorstore_spec" not in error and "Traceback" not in error
    assert _snapshot(out) == before


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "metrics.jsonl").write_text(
        '{"epoch": 1, "train_lo\n' + (out / "metrics.jsonl").read_text().splitlines()[1] + "\n"),
     "metrics.jsonl line 1 is not a metrics record (JSONDecodeError"),
    (lambda out: (out / "metrics.jsonl").write_text(
        (out / "metrics.jsonl").read_text().replace('"epoch": 2', '"epoch": 7')),
     "metrics.jsonl line 2 differs from the record saved with the checkpoint after epoch 2"),
    (lambda out: (out / "metrics.jsonl").write_text(
        (out / "metrics.jsonl").read_text().splitlines()[0] + "\n"),
     "metrics.jsonl has 1 records; the checkpoint after epoch 2 needs 2"),
    (lambda out: (out / "config.json").write_text('{"epochs": 3,'),
     "config.json: not valid JSON: Expecting property name enclosed in double quotes at line 1 column 14"),
    (lambda out: (out / "config.json").write_text('{"epochs": "three"}'),
     "config.json: config epochs='three' must be an int"),
])
def test_a_damaged_metrics_or_config_file_is_named_with_its_line(two_epoch_run, tmp_path, capsys,
                                                                  damage, message):
    out = tmp_path / "run"
    shutil.copytree(two_epoch_run[0], out)
    damage(out)
    before = _snapshot(out)
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert _snapshot(out) == before


def test_an_output_path_under_a_file_is_a_clear_error(fashion_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    for out, message in [(tmp_path / "file" / "run", "cannot create the run directory"),
                         (tmp_path / "file", "is a file, not a run directory")]:
        assert cli.main(args(fashion_dir, out, "--overwrite")) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a directory"


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
                           (["--rule", "pfa"], "rule.name='pfa': the run in"),
                           (["--model", "lenet"], "was trained with model='ffn2'"),
                           (["--set", "rule.name=nope"], "unknown"),
                           (["--set", "rule_options.rho=0.5"], "is now 'rule.options.rho'")]:
        assert cli.main(["train", "--resume", "--out", str(out), "--quiet", *extra]) == 2
        error = capsys.readouterr().err
        assert message in error
        assert "remove" not in error.lower() and "delete" not in error.lower()
        assert _snapshot(out) == before, extra
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"]) == 0


@pytest.fixture(scope="module")
def small_state():
    images = np.random.default_rng(0).random((12, 28, 28, 1), np.float32)
    labels = np.arange(12, dtype=np.int32) % 10
    state = pj.train.create_train_state(jax.random.key(0), models.get("ffn2", widths=(8,)), images[:1])
    return state, images, labels


@pytest.mark.parametrize("call, message", [
    (lambda s, x, y: pj.train.evaluate(s, x[:10], y[:7], batch_size=5),
     "evaluate: labels of shape (7,) do not match images of shape (10, 28, 28, 1)"),
    (lambda s, x, y: pj.train.evaluate(s, x, y + 5),
     r"evaluate: labels must lie in [0, 10), got values from 5 to 14"),
    (lambda s, x, y: pj.train.evaluate(s, x, y.astype(np.float32)), "labels must be integer class indices"),
    (lambda s, x, y: pj.train.evaluate(s, x[:, :14], y),
     "evaluate: images of shape (12, 14, 28, 1) do not fit the model's inputs of shape (batch, 28, 28, 1)"),
    (lambda s, x, y: pj.train.train_epoch(s, x, y - 1, jax.random.key(0), 4),
     "train_epoch: labels must lie in [0, 10), got values from -1 to 8"),
    (lambda s, x, y: jax.jit(pj.train.train_step)(s, {"image": x[:4], "label": y[:3]}),
     "train_step: labels of shape (3,) do not match images of shape (4, 28, 28, 1)"),
    (lambda s, x, y: pj.train.eval_step(s, {"image": x[:4, :, :20], "label": y[:4]}),
     "eval_step: images of shape (4, 28, 20, 1) do not fit"),
    (lambda s, x, y: pj.metrics.gradient_alignment(s, {"image": x[:4], "label": y[:3]}),
     "gradient_alignment: labels of shape (3,)"),
    (lambda s, x, y: pj.metrics.corruption(s, [{"image": x, "label": y + 10}], [0.1]),
     "corruption: labels must lie in [0, 10)"),
    (lambda s, x, y: pj.train.create_train_state(jax.random.key(0), s.model, x[0]),
     "MLP takes inputs of shape (batch, features) or (batch, height, width, channels), "
     "got shape (28, 28, 1)"),
    (lambda s, x, y: pj.train.create_train_state(jax.random.key(0), models.get("lenet"), x[0]),
     "LeNet takes inputs of shape (batch, height, width, channels), got shape (28, 28, 1)"),
    (lambda s, x, y: pj.train.create_train_state(jax.random.key(0), s.model, x[0, 0, 0]),
     "the sample of shape (1,) has no batch axis"),
    (lambda s, x, y: pj.train.create_train_state(jax.random.key(0), s.model, x[:1],
                                                 {"learning_rate": float("nan")}),
     "optimizer.learning_rate=nan must be finite"),
    (lambda s, x, y: pj.train.create_train_state(jax.random.key(0), s.model, x[:1], {"momentum": -0.5}),
     "optimizer.momentum=-0.5 must be in [0, 1)"),
    (lambda s, x, y: pj.rules.get("wm", steps="2"), "wm: steps='2' must be an int"),
])
def test_the_api_checks_shapes_labels_and_values_and_names_them(small_state, call, message):
    state, images, labels = small_state
    with pytest.raises(ValueError) as error:
        call(state, images, labels)
    assert message in str(error.value)


def test_nnx_steps_check_their_batches():
    from flax import nnx

    model = pj.nnx.models.get("ffn2", widths=(8,), input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
    optimizer = pj.nnx.train.optimizer(model, optax.sgd(0.1))
    batch = {"image": np.zeros((4, 28, 28, 1), np.float32), "label": np.full(4, 10, np.int32)}
    with pytest.raises(ValueError, match=r"nnx train_step: labels must lie in \[0, 10\)"):
        pj.nnx.train.train_step(model, optimizer, batch)
    with pytest.raises(ValueError, match=r"nnx eval_step: images of shape \(4, 28, 14, 1\)"):
        pj.nnx.train.eval_step(model, {"image": batch["image"][:, :, :14], "label": batch["label"] - 5})


def test_every_train_flag_has_a_help_text_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--rule", "default bp"), ("--model", "default ffn2"),
                          ("--dataset", "default fashion_mnist"), ("--epochs", "default 3"),
                          ("--batch-size", "default 64"), ("--seed", "default 0")]:
        assert re.search(rf"{flag} \S+ [^-]*{default}", text), flag
    assert "one of bp, fa, usf" in text and "one of ffn2, lenet" in text
    assert "one of fashion_mnist, mnist" in text


def test_the_experiment_runner_lists_every_experiment(capsys):
    from experiments import configs
    from experiments import run as runner

    assert runner.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in lines] == list(configs.names())
    assert lines[0].startswith("fig2_fashion_mnist (30 runs): ")


def test_the_tensorflow_datasets_path_opens_a_builder(tmp_path):
    """tensorflow-datasets imports ``importlib_resources`` without declaring it; the package
    depends on it so that the MNIST / CIFAR-10 path works at all in a fresh environment."""
    import tensorflow_datasets as tfds

    assert not tfds.builder("mnist", data_dir=str(tmp_path)).is_prepared()
