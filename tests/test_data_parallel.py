"""``pfa-jax train`` on every device (4 forced CPU devices, ``tests/conftest.py``) against the same
run on one device: the batch split over the devices, the state replicated, the same numbers.

Each step equals one device's to float rounding (about 1e-7 relative); over a run a ReLU whose input
lies within rounding of zero can flip and the difference grows, so the runs are short. The ResNet
run measures no gradient alignment: with BatchNorm after them, the BP gradients of its first
layers are sums that cancel almost exactly, so their angles move by about 0.1 degrees when the
parameters move by 1e-7 relative (measured), which shows the rounding of the parameters, not the
data-parallel step; ffn2's gradient angles are compared."""
import json

import numpy as np
import pytest
import runs
from fashion_files import make_fashion_dir

from pfa_jax.app import cli, placement


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    return make_fashion_dir(tmp_path_factory.mktemp("fashion"), 256, 128)


def run(fashion_dir, out, devices, *extra) -> dict:
    assert cli.main(["train", "--rule", "pfa", "--epochs", "2", "--quiet", "--out", str(out),
                     "--set", f"data_dir={fashion_dir}", "--set", "eval_batch_size=64",
                     "--set", f"devices={devices}", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("model, extra", [
    ("ffn2", ("--batch-size", "32", "--set", "model_options.widths=(64,32)",
              "--set", "metrics_batch_size=64")),
    ("resnet8", ("--batch-size", "64", "--set", "limit=128", "--set", "metrics_batch_size=0")),
])
def test_every_device_gives_the_one_device_run(fashion_dir, tmp_path, model, extra):
    many = run(fashion_dir, tmp_path / "all", 0, "--model", model, *extra)
    one = run(fashion_dir, tmp_path / "one", 1, "--model", model, *extra)
    assert (many["devices"], many["processes"], one["devices"]) == (4, 1, 1)
    assert ("gradient_alignment" in one) == (model == "ffn2")
    runs.assert_same_run(many, one)
    assert len(json.loads((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()[-1])[
        "alignment"]) == len(one["alignment"])


def test_a_run_resumes_on_another_device_count(fashion_dir, tmp_path):
    ffn2 = ("--model", "ffn2", "--batch-size", "32", "--set", "model_options.widths=(64,32)",
            "--set", "metrics_batch_size=0")
    one = run(fashion_dir, tmp_path / "one", 1, *ffn2)
    run(fashion_dir, tmp_path / "moved", 0, *ffn2, "--epochs", "1")
    moved = run(fashion_dir, tmp_path / "moved", 1, *ffn2, "--resume")
    assert moved["devices"] == 1
    runs.assert_same_run(moved, one)


@pytest.mark.parametrize("setting, message", [
    (("--batch-size", "30"), "batch_size=30 does not split evenly over the 4 devices"),
    (("--set", "eval_batch_size=50"), "eval_batch_size=50 does not split evenly over the 4"),
    (("--set", "devices=5"), "devices=5 is not available: 4 cpu device(s); valid: 0 (all) or 1..4"),
    (("--set", "devices=-1"), "devices=-1 must be an int >= 0"),
])
def test_a_batch_or_device_count_that_does_not_fit_fails_before_training(
        fashion_dir, tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    assert cli.main(["train", "--quiet", "--out", str(out), "--set", f"data_dir={fashion_dir}",
                     *setting]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_one_process_holds_every_row_and_batches_split_over_the_devices():
    where = placement.Placement.create(0)
    assert where.size == 4 and where.local_rows(64) == slice(0, 64)
    batch = where.batch({"image": np.zeros((8, 3), np.float32)}, 8)
    assert [s.data.shape for s in batch["image"].addressable_shards] == [(2, 3)] * 4
    assert placement.Placement.create(2).size == 2


@pytest.mark.parametrize("arguments, environment, message", [
    ({"num_processes": 2, "process_id": 2}, {}, r"process_id=2 must lie in \[0, num_processes=2\)"),
    ({"num_processes": 2}, {}, r"process_id=None must lie in \[0, num_processes=2\)"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, r"num_processes='two' \(or \$JAX_NUM_PROCESSES\) must be"),
])
def test_bad_process_settings_are_named_before_joining(monkeypatch, arguments, environment,
                                                       message):
    for variable in placement.ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        placement.initialize(**arguments)
