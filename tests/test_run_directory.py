"""One writer per run directory, and a command that fails leaves it byte for byte as it was
(``pfa_jax.app.rundir``): a second writer while a run trains (real processes), ``--overwrite``
whose new run fails before its first checkpoint, a resume that fails late (a checkpoint that
cannot be written, TensorBoard that cannot be written), a resume with nothing to train, stale
locks of killed processes, records past the checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from fashion_files import make_fashion_dir

from pfa_jax.app import checkpoint, cli, rundir


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    return make_fashion_dir(tmp_path_factory.mktemp("fashion"), 1024, 200)


SMALL = "--model ffn2 --rule fa --epochs 2 --batch-size 64 --quiet --set model_options.widths=(16,)"


def args(fashion_dir, out, *extra):
    """A small FA run of ``out``, two epochs unless ``extra`` says otherwise."""
    return ["train", *SMALL.split(), "--set", f"data_dir={fashion_dir}", "--out", str(out), *extra]


def snapshot(directory) -> dict:
    """Every path under ``directory``: a file's bytes, ``'dir'`` for a directory."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def full_disk(*args, **kwargs):
    """A checkpoint write on a full disk."""
    raise OSError(28, "No space left on device")


@pytest.fixture(scope="module")
def finished(fashion_dir, tmp_path_factory):
    """A finished two-epoch run, copied fresh for each test by ``run_copy``."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(args(fashion_dir, out)) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    import shutil
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_a_finished_run_leaves_no_lock(finished):
    assert not (finished / rundir.LOCK).exists()
    assert not (finished / rundir.PREVIOUS).exists()


def test_a_second_writer_is_refused_naming_the_first_and_changes_nothing(fashion_dir, tmp_path,
                                                                         capsys):
    """While a real training process holds the directory (stopped with SIGSTOP so its files stay
    still), ``--overwrite``, ``--resume`` and a plain new run on it are each refused."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "pfa_jax.app.cli",
                              *args(fashion_dir, out, "--epochs", "4")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "1").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never saved"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)
        before = snapshot(out)
        for argv in (args(fashion_dir, out, "--overwrite"), args(fashion_dir, out),
                     ["train", "--resume", "--out", str(out), "--quiet", "--epochs", "5"]):
            assert cli.main(argv) == 2
            error = capsys.readouterr().err
            assert f"is being written by process {first.pid}" in error, argv
            assert "Nothing was changed" in error and snapshot(out) == before, argv
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert not (out / rundir.LOCK).exists()


def test_a_stale_lock_of_a_killed_process_is_taken_over(run_copy):
    (run_copy / rundir.LOCK).write_text("process 999999 on elsewhere\n")  # nobody holds it
    assert cli.main(["train", "--resume", "--out", str(run_copy), "--quiet", "--epochs", "3"]) == 0
    assert len((run_copy / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (run_copy / rundir.LOCK).exists()


def test_overwrite_whose_new_run_fails_before_a_checkpoint_keeps_the_old_run(fashion_dir,
                                                                            run_copy, capsys):
    before = snapshot(run_copy)
    assert cli.main(args(fashion_dir, run_copy, "--overwrite", "--set",
                         "optimizer.learning_rate=1e12")) == 2
    assert "diverged in epoch 1" in capsys.readouterr().err
    assert snapshot(run_copy) == before


def test_overwrite_replaces_the_old_run_once_the_new_one_checkpoints(fashion_dir, run_copy,
                                                                     capsys):
    old = (run_copy / "config.json").read_text()
    assert cli.main(args(fashion_dir, run_copy, "--overwrite", "--epochs", "1", "--seed", "3")) == 0
    assert f"kept in {run_copy / rundir.PREVIOUS}" in capsys.readouterr().err
    assert not (run_copy / rundir.PREVIOUS).exists()
    assert json.loads((run_copy / "config.json").read_text())["seed"] == 3 != json.loads(old)["seed"]
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["1"]


def test_a_resume_whose_checkpoint_cannot_be_written_changes_nothing(run_copy, monkeypatch,
                                                                     capsys):
    before = snapshot(run_copy)
    monkeypatch.setattr(checkpoint.Checkpoints, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cli.main(["train", "--resume", "--out", str(run_copy), "--quiet", "--epochs", "4"])
    assert snapshot(run_copy) == before


def test_a_resume_whose_tensorboard_cannot_be_written_changes_nothing(run_copy):
    import shutil
    shutil.rmtree(run_copy / "tensorboard")
    (run_copy / "tensorboard").write_text("a file where the event directory belongs")
    before = snapshot(run_copy)
    with pytest.raises(Exception):  # noqa: B017 - whatever the event writer raises
        cli.main(["train", "--resume", "--out", str(run_copy), "--quiet", "--epochs", "4"])
    assert snapshot(run_copy) == before


def test_a_resume_with_nothing_to_train_writes_nothing(run_copy):
    before = snapshot(run_copy)
    assert cli.main(["train", "--resume", "--out", str(run_copy), "--quiet"]) == 0
    assert snapshot(run_copy) == before


def test_records_past_the_checkpoint_are_named_when_dropped(run_copy, capsys):
    with (run_copy / "metrics.jsonl").open("a") as log:
        log.write(json.dumps({"epoch": 3, "epoch_time": 1.0}) + "\n")
    assert cli.main(["train", "--resume", "--out", str(run_copy), "--quiet", "--epochs", "3"]) == 0
    assert ("metrics.jsonl has 1 record(s) past the checkpoint after epoch 2"
            in capsys.readouterr().err)
    assert [json.loads(line)["epoch"] for line in
            (run_copy / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_the_runner_leaves_a_run_another_process_trains_to_it(fashion_dir, tmp_path):
    from experiments import run as runner
    from pfa_jax.app import config as config_lib

    config = config_lib.from_json(json.dumps({"data_dir": str(fashion_dir), "epochs": 1}))
    out = tmp_path / "run"
    with rundir.RunDirectory(out):  # another writer holds it (a second open file: a second lock)
        before = snapshot(out)
        outcome = runner.train_one(config.to_json(), str(out), progress=False)
        assert "is being written by process" in outcome["busy"]
        assert snapshot(out) == before


@pytest.mark.parametrize("edit, change", [
    ({"rule": {"name": "sa"}}, "rule.name: 'sa' -> 'aa'"),  # arrays of the same shapes
    ({"optimizer": {"learning_rate": 0.01}}, "optimizer.learning_rate: 0.01 -> 0.5"),
])
def test_a_checkpoint_knows_its_config_and_a_resume_names_every_changed_key(
        fashion_dir, tmp_path, capsys, edit, change):
    out = tmp_path / "run"
    first = edit.get("rule", {}).get("name", "fa")
    assert cli.main(args(fashion_dir, out, "--rule", first, "--epochs", "1")) == 0
    config = json.loads((out / "config.json").read_text())
    if "rule" in edit:  # config.json edited by hand: sa -> aa
        config["rule"]["name"] = "aa"
        (out / "config.json").write_text(json.dumps(config, indent=2))
        extra = []
    else:
        extra = ["--set", "optimizer.learning_rate=0.5"]
    before = snapshot(out)
    assert cli.main(["train", "--resume", "--out", str(out), "--quiet", "--epochs", "2",
                     *extra]) == 2
    error = capsys.readouterr().err
    assert "trained under another config: " + change in error and "epochs" not in error.split(
        "(config.json")[0]
    assert "A resume may change only epochs, devices" in error
    assert snapshot(out) == before


def test_a_resume_may_change_the_epochs_and_the_measurements(run_copy):
    assert cli.main(["train", "--resume", "--out", str(run_copy), "--quiet", "--epochs", "3",
                     "--set", "metrics_batch_size=16", "--set", "sharpness.enabled=True",
                     "--set", "sharpness.examples=32", "--set", "sharpness.iterations=2",
                     "--set", "sharpness.probes=2"]) == 0
    assert "sharpness" in json.loads((run_copy / "summary.json").read_text())


def test_a_damaged_checkpoint_is_named_in_one_line_without_the_storage_dump(run_copy, capfd):
    data = max((p for p in (run_copy / "checkpoints" / "2").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a truncated array file
    assert cli.main(["train", "--resume", "--out", str(run_copy), "--quiet", "--epochs", "3"]) == 0
    error = capfd.readouterr().err
    warning = [line for line in error.splitlines() if "checkpoints/2" in line]
    assert len(warning) == 1 and "cannot be read" in warning[0], error
    assert "Exception ignored" not in error and "TensorStore" not in error, error


def test_a_checkpoint_the_disk_cannot_take_is_one_line_and_changes_nothing(run_copy, monkeypatch,
                                                                           capfd):
    import orbax.checkpoint as ocp
    before = snapshot(run_copy)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    assert cli.main(["train", "--resume", "--out", str(run_copy), "--quiet", "--epochs", "4"]) == 2
    error = capfd.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "checkpoints/3 could not be written (OSError: [Errno 28] No space" \
        in error[0], error
    assert snapshot(run_copy) == before
