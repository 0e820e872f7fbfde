"""The ``pfa-jax`` command end to end on a small generated Fashion-MNIST directory."""
import json
import pathlib
import re
import shutil

import chex
import numpy as np
import pytest
import runs
from fashion_files import make_fashion_dir

from pfa_jax import rules
from pfa_jax.app import cli, writers


def train_args(fashion_dir, out, *extra):
    return ["train", "--model", "ffn2", "--epochs", "2", "--batch-size", "32", "--quiet",
            "--set", f"data_dir={fashion_dir}", "--set", "model_options.widths=(32,)",
            "--out", str(out), *extra]


def test_train_writes_a_run_directory(fashion_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_args(fashion_dir, out, "--rule", "pfa",
                               "--set", "rule.options.expansion=2")) == 0
    assert "final test accuracy" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[-1]["alignment"]) == {"hidden_0", "output"}
    assert 0.0 <= records[-1]["test_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    # config.json records what was stored: PFA under SGD in the "G" form (rules.product_feedback)
    assert config["rule"] == {"name": "pfa", "options": {"expansion": 2, "form": "G"}, "layers": {}}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 * (256 // 32)


def test_existing_run_directory_is_kept(fashion_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    assert cli.main(train_args(fashion_dir, out, "--rule", "fa")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "precious\n"


@pytest.mark.parametrize("extra, message", [
    (["--rule", "nope"], "valid: " + ", ".join(rules.names())),
    (["--model", "vgg"], "vgg"),
    (["--set", "bogus=1"], "unknown config key 'bogus'"),
    (["--set", "data_dir='/nonexistent'"], "apt-get install -y dataset-fashion-mnist"),
    (["--set", "optimizer.learning_rate=1e12"], "diverged"),
])
def test_bad_input_gives_a_clear_error(fashion_dir, tmp_path, capsys, extra, message):
    assert cli.main(train_args(fashion_dir, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err


def test_lists(capsys):
    assert cli.main(["rules"]) == 0
    assert capsys.readouterr().out.split() == list(rules.names())


def test_train_logs_gradient_alignment_and_closing_metrics(fashion_dir, tmp_path):
    out = tmp_path / "run"
    metric_options = ["metrics_batch_size=64", "sharpness.enabled=True", "sharpness.examples=64",
                      "sharpness.iterations=5", "sharpness.probes=4",
                      "robustness.adversarial_epsilons=(0.0, 0.1)", "robustness.pgd_steps=2",
                      "robustness.noise_sigmas=(0.0, 0.5)", "robustness.examples=50"]
    assert cli.main(train_args(fashion_dir, out, "--rule", "fa",
                               *[a for option in metric_options for a in ("--set", option)])) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert set(record["gradient_alignment"]) == {"hidden_0", "output"}
        assert set(record["gradient_alignment"]["hidden_0"]) == {
            "grad_angle", "delta_angle", "delta_norm_rule", "delta_norm_bp"}
        assert record["gradient_alignment"]["output"]["grad_angle"] < 1e-3
    assert "gradient angle to BP (deg): hidden_0" in writers.format_record(records[-1], 2)
    summary = json.loads((out / "summary.json").read_text())
    assert {"top_eigenvalue", "converged", "trace", "trace_std_error"} <= set(summary["sharpness"])
    assert set(summary["adversarial"]) == {"fgsm", "pgd"}
    for result in summary["adversarial"].values():
        assert result["epsilons"] == [0.0, 0.1] and not result["diagnostic"]
        assert result["robust_accuracy"][0] == result["clean_accuracy"]
        assert result["robust_accuracy"][1] <= result["clean_accuracy"]
    clean = summary["adversarial"]["fgsm"]["clean_accuracy"]
    assert summary["noise"]["accuracy"][0] == pytest.approx(clean)


@pytest.mark.parametrize("option, message", [
    ("robustness.attacks=('cw',)", "valid attacks: fgsm, pgd"),
    ("robustness.adversarial_epsilons=(-0.1,)", "epsilons must be >= 0"),
    ("robustness.noise_sigmas=(-1.0,)", "noise_sigmas=(-1.0,) must be finite and >= 0"),
    ("robustness.noise_sigmas=(0.1,)", "robustness.examples=0 must be an int >= 1"),
    ("sharpness.enabled=True", "sharpness.probes=1 must be an int >= 2"),
    ("sharpness.tolerance=inf", "sharpness.tolerance=inf must be finite"),
])
def test_bad_metric_options_fail_before_training(fashion_dir, tmp_path, capsys, option, message):
    out = tmp_path / "run"
    extra = {"robustness.noise_sigmas=(0.1,)": ["--set", "robustness.examples=0"],
             "sharpness.enabled=True": ["--set", "sharpness.probes=1"],
             "sharpness.tolerance=inf": ["--set", "sharpness.enabled=True"]}.get(option, [])
    assert cli.main(train_args(fashion_dir, out, "--set", option, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not out.exists()





def test_resume_ends_with_the_metrics_of_an_uninterrupted_run(fashion_dir, tmp_path, capsys):
    rule = ["--rule", "pfa", "--set", "rule.options.expansion=2",
            "--set", "optimizer.weight_decay=(0.01, 1e-4)", "--set", "optimizer.wd_milestones=(1,)"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main(train_args(fashion_dir, straight, *rule, "--epochs", "4")) == 0
    assert cli.main(train_args(fashion_dir, resumed, *rule)) == 0
    assert len(runs.records(resumed)) == 2
    # another rule is named as such (not as an option of it: the run's config has PFA's form)
    assert cli.main(["train", "--resume", "--out", str(resumed), "--rule", "kp", "--quiet"]) == 2
    assert "rule.name='kp': the run in" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out", str(resumed), "--epochs", "4", "--quiet"]) == 0
    runs.assert_close(runs.records(resumed), runs.records(straight))
    assert json.loads((resumed / "config.json").read_text())["epochs"] == 4


@pytest.mark.parametrize("argv, message", [
    (["train", "--resume", "--quiet"], "--resume needs --out"),
    (["train", "--resume", "--out", "/nonexistent/run", "--quiet"], "not a run directory"),
])
def test_resume_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("model, stepped", [("lenet", True), ("ffn2", False)])
def test_a_stepped_epoch_shows_a_live_step_bar(fashion_dir, tmp_path, capsys, model, stepped):
    """On CPU a conv model's epoch is a loop of steps: an inner bar shows the live train loss. An
    MLP's epoch is one scan, so it has no step bar."""
    assert cli.main(["train", "--model", model, "--epochs", "1", "--batch-size", "32",
                     "--set", f"data_dir={fashion_dir}", "--out", str(tmp_path / "run")]) == 0
    step_bar = re.search(r"epoch 1: .*\| \d/8 .*acc=\d+\.\d\d%, loss=\d+\.\d{4}",
                         capsys.readouterr().err)
    assert bool(step_bar) == stepped


def test_a_run_directory_written_before_the_config_sections_resumes_exactly(tmp_path):
    """``records/run_before_sections`` was written by the code of commit 75ba5dc (flat config keys,
    the old optimizer-state layout): ffn2 (8 hidden units) with PFA (r = 2) on generated data, one
    epoch. Resumed for a second epoch, it ends with the metrics of an uninterrupted two-epoch run."""
    fashion = make_fashion_dir(tmp_path, 256, 100)
    old = tmp_path / "old"
    shutil.copytree(pathlib.Path(__file__).parent / "records" / "run_before_sections", old)
    written = (old / "config.json").read_text()
    assert cli.main(["train", "--resume", "--out", str(old), "--epochs", "2", "--quiet",
                     "--set", f"data_dir={fashion}"]) == 0
    assert json.loads(written)["rule"] == "pfa"  # the flat layout of that time
    migrated = json.loads((old / "config.json").read_text())
    # Written before PFA's storage forms: it keeps the "R" form its checkpoint holds. The new run
    # below stores "F" (SGD): the two forms give the same metrics.
    assert migrated["rule"] == {"name": "pfa", "options": {"expansion": 2, "form": "R"},
                                "layers": {}}
    assert cli.main(["train", "--rule", "pfa", "--epochs", "2", "--batch-size", "32", "--quiet",
                     "--out", str(tmp_path / "new"), "--set", f"data_dir={fashion}",
                     "--set", "model_options={'widths': (8,)}", "--set", "rule.options.expansion=2",
                     "--set", "metrics_batch_size=32", "--set", "eval_batch_size=100",
                     "--set", "optimizer.learning_rate=0.05"]) == 0
    resumed, straight = (
        [{k: v for k, v in json.loads(line).items() if k != "epoch_time"}
         for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (old, tmp_path / "new"))
    assert len(resumed) == len(straight) == 2
    chex.assert_trees_all_close(resumed, straight, rtol=1e-5, atol=1e-6)


def test_tensorboard_shows_the_records_and_the_steps_once_also_after_a_resume(fashion_dir, tmp_path):
    out = tmp_path / "run"
    argv = train_args(fashion_dir, out, "--rule", "kp", "--set", "log_every_steps=3")
    assert cli.main(argv) == 0
    shutil.rmtree(out / "checkpoints" / "2")  # the run resumes from epoch 1 and trains epoch 2 again
    assert cli.main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    scalars, records = runs.scalars(out), runs.records(out)
    steps = 256 // 32
    assert [s for s, _ in scalars["step/loss"]] == [3, 6, 11, 14]  # every 3rd step of each epoch
    assert [s for s, _ in scalars["step/learning_rate"]] == [3, 6, 11, 14]
    for tag, key in [("train/loss", "train_loss"), ("test/accuracy", "test_accuracy")]:
        assert [s for s, _ in scalars[tag]] == [steps, 2 * steps]
        np.testing.assert_allclose([v for _, v in scalars[tag]], [r[key] for r in records], rtol=1e-6)
    for layer in ("hidden_0", "output"):
        np.testing.assert_allclose(
            [v for _, v in scalars[f"alignment/{layer}/weight_angle"]],
            [r["alignment"][layer]["weight_angle"] for r in records], rtol=1e-5)
    assert "gradient_alignment/hidden_0/grad_angle" in scalars
