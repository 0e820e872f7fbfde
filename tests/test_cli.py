"""The ``pfa-jax`` command end to end on a small generated Fashion-MNIST directory."""
import json

import pytest
from test_data import raw_fashion, write_idx

from pfa_jax import cli, rules


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fashion")
    for prefix, seed, n in [("train", 0, 256), ("t10k", 1, 100)]:
        images, labels = raw_fashion(seed, n)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, True)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels, True)
    return directory


def train_args(fashion_dir, out, *extra):
    return ["train", "--model", "ffn2", "--epochs", "2", "--batch-size", "32", "--quiet",
            "--set", f"data_dir={fashion_dir}", "--set", "model_options.widths=(32,)",
            "--out", str(out), *extra]


def test_train_writes_a_run_directory(fashion_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_args(fashion_dir, out, "--rule", "pfa",
                               "--set", "rule_options.expansion=2")) == 0
    assert "final test accuracy" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[-1]["alignment"]) == {"hidden_0", "output"}
    assert 0.0 <= records[-1]["test_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["rule"] == "pfa" and config["rule_options"] == {"expansion": 2}
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
    (["--rule", "nope"], "valid rules: " + ", ".join(rules.names())),
    (["--model", "vgg"], "vgg"),
    (["--set", "bogus=1"], "unknown config key 'bogus'"),
    (["--set", "optimizer.learning_rate=1e12"], "diverged"),
])
def test_bad_input_gives_a_clear_error(fashion_dir, tmp_path, capsys, extra, message):
    assert cli.main(train_args(fashion_dir, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err


def test_lists(capsys):
    assert cli.main(["rules"]) == 0
    assert capsys.readouterr().out.split() == list(rules.names())
