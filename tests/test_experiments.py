"""The experiment harness: every config validates, the sweep runner trains, skips, resumes and
records divergence, the report renders from run directories alone, and the Colab notebook runs."""
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import runs

from experiments import configs, report
from experiments import run as runner
from pfa_jax.app import config as config_lib
from pfa_jax.app import spec




@pytest.mark.parametrize("name", configs.names())
def test_every_run_of_every_config_validates(name):
    module = configs.load(name)
    runs = module.runs()
    assert runs and len({r.name for r in runs}) == len(runs)
    for run in runs:
        config = runner.run_config(name, run, ["epochs=50"] if "resnet20" in name else [])
        spec.resolve(config)
        assert config.rule.name == run.labels.get("rule", config.rule.name)
        assert config.seed == run.labels["seed"]


def test_paper_settings():
    fig2 = {r.name: r for r in configs.load("fig2_mnist").runs()}
    pfa = runner.run_config("fig2_mnist", fig2["pfa-seed3"])
    assert (pfa.epochs, pfa.batch_size, pfa.optimizer.learning_rate) == (40, 64, 0.01)
    assert pfa.optimizer.lr_milestones == (20, 30) and pfa.optimizer.lr_decay == 0.5
    assert pfa.optimizer.weight_decay == (0.03, 9e-5) and pfa.optimizer.wd_milestones == (1,)
    assert runner.run_config("fig2_mnist", fig2["bp-seed0"]).optimizer.weight_decay == 1e-4
    fig4 = {r.labels["rule"]: runner.run_config("fig4_cifar10", r)
            for r in configs.load("fig4_cifar10").runs()}
    assert fig4["dfa"].optimizer.learning_rate == 0.001 and fig4["bp"].optimizer.learning_rate == 0.1
    assert (fig4["bp"].holdout, fig4["bp"].augment, fig4["bp"].epochs) == (5000, "crop_flip", 250)
    assert fig4["pfa"].optimizer.weight_decay == (0.005, 1e-4)
    # DFA as the authors' code: the class error through each conv's own stride (rules.direct_feedback)
    assert fig4["dfa"].rule.options.grid == "output" and spec.resolve(fig4["dfa"]).rule.grid == "output"
    resnet20 = {r.labels["rule"]: runner.run_config("resnet20_fashion_mnist", r)
                for r in configs.load("resnet20_fashion_mnist").runs()}
    assert resnet20["dfa"].rule.options.grid == "output"
    # the Two Routes rules: feedback without momentum, lr * scale within each network's bounds
    zoo = {(r.labels["model"], r.labels["method"]): runner.run_config("rules_zoo_fashion_mnist", r)
           for r in configs.load("rules_zoo_fashion_mnist").runs()}
    for model, lr, rates in (("ffn2", 0.01, [0.3, 1.0, 0.03]), ("resnet20", 0.1, [0.3, 0.2, 0.001])):
        sa, aa, ia = zoo[model, "sa"], zoo[model, "aa"], zoo[model, "ia"]
        assert sa.optimizer.learning_rate == aa.optimizer.learning_rate == lr
        assert [c.rule.options.scale * lr for c in (sa, aa, ia)] == pytest.approx(rates)
        assert sa.optimizer.feedback.momentum == ia.optimizer.feedback.momentum == 0.0
        assert sa.optimizer.momentum == 0.9
    # the probed variants: their rule's run but for the loss on 16 rows of the batch
    probed = {key: c for key, c in zoo.items() if key[1].endswith("_probe16")}
    assert sorted(probed) == [("ffn2", "aa_probe16"), ("ffn2", "ia_probe16"), ("resnet20", "aa_probe16")]
    for (model, method), c in probed.items():
        assert c.rule.options.probe_batch == 16
        unprobed = zoo[model, method.removesuffix("_probe16")].to_dict()
        assert {**unprobed, "rule": {**unprobed["rule"], "options": {
            **unprobed["rule"]["options"], "probe_batch": 16}}} == c.to_dict()
    shared = {r.labels["method"]: r.source for r in configs.load("rules_zoo_fashion_mnist").runs()
              if r.labels["model"] == "resnet20" and r.source}
    assert shared == {rule: f"resnet20_fashion_mnist/{rule}-seed0" for rule in ("bp", "fa", "kp", "dfa")}
    for rule in shared:  # the same runs, stored in resnet20_fashion_mnist
        assert zoo["resnet20", rule].to_dict() == resnet20[rule].to_dict()
    # PFA under the papers' SGD stores G (identical training, KP's cost); F at r = 1
    assert spec.resolve(fig4["pfa"]).rule.form == "G"
    assert spec.resolve(fig4["pfa_o"]).rule.form == "G"
    fig5 = {r.labels["rule"]: r for r in configs.load("fig5_imagenet").runs()}
    assert spec.resolve(runner.run_config("fig5_imagenet", fig5["pfa"])).rule.form == "G"
    expansion = {r.labels["r"]: r for r in configs.load("expansion_fashion_mnist").runs()}
    forms = {r: spec.resolve(runner.run_config("expansion_fashion_mnist", run)).rule.form
             for r, run in expansion.items()}
    assert forms == {1: "F", 2: "G", 5: "G", 10: "G", 20: "G", 50: "G"}
    sparse = configs.load("sparse_fashion_mnist").runs()
    assert {(r.labels["rule"], r.labels["density"]) for r in sparse} == {
        (rule, d) for rule in ("fa", "dfa", "usf", "pfa") for d in (1, .5, .3, .17, .1, .05)}


def test_unknown_experiment_and_bad_override_are_refused(capsys):
    with pytest.raises(ValueError, match="unknown experiment 'fig9'; valid: fig2_fashion_mnist"):
        configs.load("fig9")
    assert runner.main(["fig2_fashion_mnist", "--set", "epochs=0", "--list"]) == 2
    assert "epochs=0 must be an int >= 1" in capsys.readouterr().err


def _records(run_dir):
    """The run's epoch records without their wall times."""
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_time"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(out, fashion_dir, *extra):
    return runner.main(["soft_alignment_mlp", "--out", str(out), "--quiet", "--only",
                        "*depth2*", *[a for s in runs.TINY + [f"data_dir={fashion_dir}",
                                                         "noise_pretrain_steps=5"]
                                      for a in ("--set", s)], *extra])


def test_sweep_runs_skips_resumes_and_reports(fashion_dir, tmp_path, capsys):
    out = tmp_path / "results"
    only = ["--only", "[bf]*_rho0.5-depth2*"]
    assert _run(out, fashion_dir, "--only", "fa_rho0.5-depth2*") == 0
    exp_dir = out / "soft_alignment_mlp"
    summary = json.loads((exp_dir / "fa_rho0.5-depth2-seed0" / "summary.json").read_text())
    assert summary["epoch"] == 2 and "sharpness" in summary and "adversarial" in summary
    # Interrupt a finished run back to its first epoch: the runner resumes it to the same end.
    run_dir = exp_dir / "fa_rho0.5-depth2-seed0"
    records = _records(run_dir)
    (run_dir / "summary.json").unlink()
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["1", "2"]
    shutil.rmtree(checkpoints[1])
    capsys.readouterr()
    assert runner.main(["soft_alignment_mlp", "--out", str(out), "--list", *only]) == 0
    assert "fa_rho0.5-depth2-seed0: partial" in capsys.readouterr().out
    assert _run(out, fashion_dir, *only) == 0
    assert "1 of 1 runs to train" in capsys.readouterr().out
    assert _records(run_dir) == records
    resumed = json.loads((run_dir / "summary.json").read_text())
    epoch_times = [json.loads(line)["epoch_time"]
                   for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert resumed["wall_time"] >= sum(epoch_times)  # counts the restored epoch too
    assert resumed["machine"] == summary["machine"] == f"CPU, {os.cpu_count()} cores"
    assert _run(out, fashion_dir, *only) == 0
    assert "0 of 1 runs to train (1 finished before)" in capsys.readouterr().out
    record = json.loads((exp_dir / "experiment.json").read_text())
    assert len(record["invocations"]) == 3 and record["invocations"][0]["platform"] == "cpu"
    assert record["invocations"][0]["xla_flags"] == os.environ.get("XLA_FLAGS", "")

    page = tmp_path / "page" / "RESULTS.md"
    page.parent.mkdir()
    text = report.render(out, page)
    row = next(line for line in text.splitlines() if line.startswith("| fa rho=0.5 | 2 |"))
    assert f"| {100 * summary['test_accuracy']:.2f} |" in row
    assert "(1 finished, 0 diverged, 26 missing)" in text and "`bp-depth2-seed0` has not finished." in text
    assert (page.parent / "figures" / "soft_alignment_mlp_curves.png").stat().st_size > 10_000


def test_only_matching_no_run_is_refused_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "results"
    assert runner.main(["vit_fashion_mnist", "--out", str(out), "--only", "vit-*"]) == 2
    assert "--only 'vit-*' matches no run of vit_fashion_mnist; their runs: bp-seed0" in (
        capsys.readouterr().err)
    assert not out.exists()


def test_report_names_the_xla_flags_an_invocation_ran_under():
    invocation = {"device": "cpu", "platform": "cpu", "cpu_cores": 2, "cpu": "AMD EPYC",
                  "jax": "0.10.2", "wall_time": 60.0, "workers": 1}
    flagged = {**invocation, "xla_flags": "--xla_cpu_experimental_ynn_fusion_type="}
    line = report.hardware_line({"invocations": [invocation, flagged]})
    assert "JAX 0.10.2)" in line  # the record without the key (older ones) and without flags
    assert "JAX 0.10.2, XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=)" in line
    assert report.hardware_line({"invocations": [{**flagged, "xla_flags": ""}]}).count("XLA") == 0


def test_report_names_the_machine_of_each_row_only_when_runs_ran_on_several():
    def run(rule, machine):
        summary = {"test_accuracy": 0.5, "wall_time": 10.0, "alignment": {}}
        return {"labels": {"rule": rule, "seed": 0}, "state": "done",
                "summary": {**summary, **({"machine": machine} if machine else {})}}

    one = report.table([run("bp", "CPU, 2 cores"), run("fa", "CPU, 2 cores")])
    assert "machine" not in one[0] and one[2].endswith("| 10 |")
    mixed = report.table([run("bp", "NVIDIA H100 80GB HBM3"), run("fa", None)])
    assert mixed[0].endswith("| train time / run (s) | machine |")
    assert mixed[2].endswith("| 10 | NVIDIA H100 80GB HBM3 |")
    assert mixed[3].endswith("| 10 | not recorded |")


def test_transformer_report_averages_each_projection_kind_over_blocks_and_seeds():
    def angles(key, base):
        return {f"block_{b}/attention/{p}": {key: base + 10 * b + i}
                for b in (0, 1) for i, p in enumerate(("query", "key"))} | {"output": {key: base}}

    def run(rule, seed, bits):
        weights = {} if rule == "dfa" else angles("weight_angle", 40 + seed)
        summary = {"alignment": weights, "gradient_alignment": angles("grad_angle", 20 + seed),
                   "test_bits_per_token": bits[-1]}
        return {"labels": {"rule": rule, "seed": seed}, "state": "done", "summary": summary,
                "records": [{"test_bits_per_token": b, "alignment": weights} for b in bits]}

    from experiments import transformer_report
    grouped = report.groups([run("fa", 0, [4.0, 3.0]), run("fa", 1, [4.2, 3.0]),
                             run("dfa", 0, [4.0, 3.5])])
    table = transformer_report.angle_table(grouped)
    assert table[0] == "| rule | query | key | output |"
    # fa: query over blocks 0 and 1 and seeds 0 and 1: weight (40 + 50 + 41 + 51) / 4
    assert table[2] == "| fa | 45.5 / 25.5 | 46.5 / 26.5 | 40.5 / 20.5 |"
    assert table[3] == "| dfa | n/a / 25.0 | n/a / 26.0 | n/a / 20.0 |"
    bits = transformer_report.bits_table(grouped)
    assert bits[2] == "| fa | 2 | 3.000 ± 0.000 | 4.100 ± 0.141 | 1.100 ± 0.141 |"


def test_a_shared_run_is_trained_listed_and_reported_where_its_source_lives(
        fashion_dir, tmp_path, monkeypatch, capsys):
    """A sweep entry with ``source`` names another experiment's run of the same config: the
    runner trains it into the source's directory (once), lists its state from there, and the
    report reads it from there; a config that differs from the source's, or an absent source, is
    refused before anything trains."""
    source_name = "soft_alignment_mlp/bp-depth2-seed0"
    source = next(r for r in configs.load("soft_alignment_mlp").runs() if r.name == "bp-depth2-seed0")
    fig2 = configs.load("fig2_fashion_mnist")
    same = configs.common.differences(fig2.get_config(),
                                      runner.run_config("soft_alignment_mlp", source))
    sweep = [configs.common.Run("shared-bp-depth2-seed0", {"rule": "bp", "seed": 0}, same, source_name)]
    monkeypatch.setattr(fig2, "runs", lambda: sweep)
    out = tmp_path / "results"
    tiny = [a for s in runs.TINY + [f"data_dir={fashion_dir}", "noise_pretrain_steps=5"]
            for a in ("--set", s)]
    assert runner.main(["fig2_fashion_mnist", "soft_alignment_mlp", "--only", "*bp-depth2-seed0",
                        "--list", "--out", str(out), *tiny]) == 0
    printed = capsys.readouterr().out
    assert "fig2_fashion_mnist/shared-bp-depth2-seed0: new (stored as " + source_name in printed
    # both experiments list the run: it trains once, in the source's directory
    assert runner.main(["fig2_fashion_mnist", "soft_alignment_mlp", "--only", "*bp-depth2-seed0",
                        "--out", str(out), "--quiet", *tiny]) == 0
    assert "1 of 1 runs to train (0 finished before)" in capsys.readouterr().out
    summary = json.loads((out / source_name / "summary.json").read_text())
    assert not (out / "fig2_fashion_mnist" / "shared-bp-depth2-seed0").exists()
    record = json.loads((out / "fig2_fashion_mnist" / "experiment.json").read_text())
    assert record["runs"] == [{"name": "shared-bp-depth2-seed0", "labels": {"rule": "bp", "seed": 0},
                               "source": source_name}]
    assert runner.main(["fig2_fashion_mnist", "--out", str(out), *tiny]) == 0
    assert "0 of 1 runs to train (1 finished before)" in capsys.readouterr().out
    text = report.render(out, tmp_path / "RESULTS.md")
    section = text[text.index("## fig2_fashion_mnist"):]
    assert "(1 finished, 0 diverged, 0 missing)" in section
    assert f"| {100 * summary['test_accuracy']:.2f} |" in section

    sweep[0] = dataclasses.replace(sweep[0], overrides={**same, "optimizer.learning_rate": 0.5})
    assert runner.main(["fig2_fashion_mnist", "--out", str(out), *tiny]) == 2
    assert (f"fig2_fashion_mnist/shared-bp-depth2-seed0: its config differs from its source "
            f"{source_name}'s at ['optimizer.learning_rate']") in capsys.readouterr().err
    sweep[0] = dataclasses.replace(sweep[0], overrides=same, source="soft_alignment_mlp/bp-seed9")
    assert runner.main(["fig2_fashion_mnist", "--out", str(out), *tiny]) == 2
    assert ("source 'soft_alignment_mlp/bp-seed9' is not a run of its own of experiment "
            "'soft_alignment_mlp'") in capsys.readouterr().err


def test_diverging_run_is_recorded_and_the_sweep_goes_on(fashion_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert _run(out, fashion_dir, "--only", "bp-depth2*", "--set", "optimizer.learning_rate=1e9",
                "--set", "robustness.adversarial_epsilons=()", "--set", "sharpness.enabled=False") == 0
    assert "bp-depth2-seed0: diverged: training diverged in epoch 1" in capsys.readouterr().out
    recorded = json.loads((out / "soft_alignment_mlp" / "bp-depth2-seed0" / "diverged.json").read_text())
    assert recorded["error"].startswith(recorded["diagnosis"] + ". ")
    assert "start again" in recorded["error"] and "start again" not in recorded["diagnosis"]
    text = report.render(out, tmp_path / "RESULTS.md")
    # the report shows the diagnosis alone: no advice, no path of the machine the run ran on
    assert "1 diverged" in text and f"- `bp-depth2-seed0` diverged: {recorded['diagnosis']}\n" in text


def test_report_without_results_names_the_fix(tmp_path, capsys):
    assert report.main(["--results", str(tmp_path), "--out", str(tmp_path / "R.md")]) == 2
    assert "python -m experiments.run NAME" in capsys.readouterr().err


def test_every_committed_run_config_migrates_to_its_experiment_config():
    """config.json files (most written before the config had sections) migrate to exactly the
    config the experiment resolves to today. A PFA run written before the storage forms has no
    ``rule.options.form``: it stored R, which trains as the G (or F) that SGD resolves to (the
    identity of rules.product_feedback), so the form is not compared there; nor is DFA's grid of
    a run written before ``grid='output'`` became the default (it keeps ``'input'``)."""
    results = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "results"
    paths = sorted(results.glob("*/*/config.json"))
    assert len(paths) > 100
    for path in paths:
        name, run_name = path.parts[-3], path.parts[-2]
        run = next(r for r in configs.load(name).runs() if r.name == run_name)
        migrated = config_lib.from_json(path.read_text())
        expected = spec.resolve(runner.run_config(name, run)).config.to_dict()
        for option in ("form", "grid"):  # older runs lack them: load_config fills in the trained ones
            if option not in migrated.rule.options:
                expected["rule"]["options"].pop(option, None)
        assert migrated.to_dict() == expected, path


def test_old_config_keys_given_to_set_name_their_new_place():
    config = config_lib.default_config()
    for old, new in [("rule_options.rho", "rule.options.rho"), ("rule", "rule.name"),
                     ("sharpness", "sharpness.enabled"), ("pgd_steps", "robustness.pgd_steps")]:
        with pytest.raises(ValueError, match=f"config key '{old}' is now '{new}'"):
            config_lib.override(config, [f"{old}=1"])


@pytest.mark.slow
def test_workers_stop_when_their_invocation_is_killed(fashion_dir, tmp_path):
    """``--workers 2``: killing the invocation (SIGKILL, which no handler sees) stops its workers
    too, so no orphan goes on writing a run directory that a later invocation resumes."""
    out = tmp_path / "results"
    command = [sys.executable, "-m", "experiments.run", "soft_alignment_mlp", "--out", str(out),
               "--quiet", "--workers", "2", "--only", "fa_rho0.[25]*-depth2-seed0",
               *[a for s in runs.TINY + [f"data_dir={fashion_dir}", "epochs=100000"]
                 for a in ("--set", s)]]
    invocation = subprocess.Popen(command, cwd=pathlib.Path(__file__).parent.parent,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logs = [out / "soft_alignment_mlp" / run / "metrics.jsonl"
            for run in ("fa_rho0.5-depth2-seed0", "fa_rho0.25-depth2-seed0")]
    deadline = time.monotonic() + 300
    while not all(log.exists() for log in logs):
        assert time.monotonic() < deadline and invocation.poll() is None, "no run started"
        time.sleep(0.2)
    invocation.send_signal(signal.SIGKILL)
    invocation.wait()
    time.sleep(4)  # a worker notices within a second
    lengths = [len(log.read_text().splitlines()) for log in logs]
    time.sleep(4)
    assert [len(log.read_text().splitlines()) for log in logs] == lengths
    assert all(n < 100000 for n in lengths)


def test_invocations_side_by_side_each_update_their_own_entry(tmp_path):
    """Two invocations of one experiment at once: each rewrites its own entry of
    ``experiment.json`` (found by its id), never the other's, and leaves no staged file."""
    started = time.time() - 100
    first, second = ({**runner.hardware(), "id": name, "workers": 1, "overrides": []}
                     for name in ("first", "second"))
    runner._record_invocation(tmp_path, "rules_zoo_fashion_mnist", started, first)
    runner._record_invocation(tmp_path, "rules_zoo_fashion_mnist", started + 50, second)
    runner._record_invocation(tmp_path, "rules_zoo_fashion_mnist", started, first)
    record = json.loads((tmp_path / "experiment.json").read_text())
    assert [entry["id"] for entry in record["invocations"]] == ["first", "second"]
    first_time, second_time = (entry["wall_time"] for entry in record["invocations"])
    assert first_time >= 100 and 50 <= second_time < 100
    assert [p.name for p in tmp_path.iterdir()] == ["experiment.json"]
    assert record["runs"][0]["name"] == configs.load("rules_zoo_fashion_mnist").runs()[0].name


def test_the_invocation_record_is_kept_up_to_date_until_stopped():
    calls = []
    stop = runner._keep_recording(lambda: calls.append(time.monotonic()), every=0.01)
    deadline = time.monotonic() + 30
    while len(calls) < 3:
        assert time.monotonic() < deadline, "never recorded"
        time.sleep(0.01)
    stop.set()
    time.sleep(0.1)
    stopped = len(calls)
    time.sleep(0.1)
    assert len(calls) == stopped
