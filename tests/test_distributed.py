"""Multi-process data parallelism: two processes on localhost (``jax.distributed`` with CPU gloo
collectives, two CPU devices each) train ``ffn2`` with PFA on a batch sharded over all four devices,
and end with the same parameters and feedback as one process training on the whole batch: with
``train_step`` directly, and as two processes of the ``pfa-jax train`` command (also killed in
epoch 2 and resumed)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import pfa_jax as pj

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(tmp_path, num_processes=2):
    out = tmp_path / "result.npz"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")]))
    finish([subprocess.Popen([sys.executable, worker.__file__, str(port), str(i),
                              str(num_processes), str(out)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(num_processes)],
           TIMEOUT_S)
    return dict(np.load(out))


def finish(procs, timeout: float) -> list[str]:
    """The processes' output, once each has exited with status 0 within ``timeout`` seconds
    (killed and failed otherwise)."""
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the processes did not finish in {timeout} s")
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"
    return logs


def reference():
    """One process, one device, the whole global batch every step."""
    state = worker.initial_state(pj, jax)
    step = jax.jit(pj.train.train_step)
    for batch in worker.batches():
        state, metrics = step(state, jax.device_put(batch, jax.devices()[0]))
    return worker.flat({"params": state.params, "feedback": state.feedback,
                        "loss": metrics["loss"]})


@pytest.mark.slow  # the command's two-process test below covers this path end to end
def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    distributed = run_workers(tmp_path)
    expected = reference()
    assert sorted(distributed) == sorted(expected)
    assert any(k.endswith("/R") for k in expected)  # PFA's plastic feedback took part
    for name, value in expected.items():
        np.testing.assert_allclose(distributed[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    initial = worker.flat({"params": worker.initial_state(pj, jax).params})
    assert any(not np.allclose(initial[k], expected[k]) for k in initial)  # training moved them


# -- the command ---------------------------------------------------------------------------------
COMMAND_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    from fashion_files import make_fashion_dir

    return make_fashion_dir(tmp_path_factory.mktemp("fashion"), 2048, 256)


def command_args(fashion_dir, out, *extra) -> list[str]:
    """A 3-epoch PFA run of 32 steps per epoch (the processes hold 2 devices each)."""
    return ["train", "--rule", "pfa", "--epochs", "3", "--quiet", "--out", str(out),
            "--set", f"data_dir={fashion_dir}", "--set", "model_options.widths=(64,32)",
            "--set", "eval_batch_size=256", *extra]


def start_processes(argv: list[str], num_processes: int = 2) -> list[subprocess.Popen]:
    """``pfa-jax`` with ``argv`` in ``num_processes`` processes joined on localhost, with two CPU
    devices each."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               + " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                          if "device_count" not in f))
    return [subprocess.Popen([sys.executable, "-m", "pfa_jax.app.cli", *argv, "--coordinator",
                              f"localhost:{port}", "--num-processes", str(num_processes),
                              "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(num_processes)]


@pytest.fixture(scope="module")
def one_process(fashion_dir, tmp_path_factory):
    """The summary of the run in this process, on one device."""
    from pfa_jax.app import cli

    out = tmp_path_factory.mktemp("one") / "run"
    assert cli.main(command_args(fashion_dir, out, "--set", "devices=1")) == 0
    return json.loads((out / "summary.json").read_text())


def assert_same_summary(summary: dict, expected: dict) -> None:
    import runs

    assert (summary["devices"], summary["processes"]) == (4, 2)
    runs.assert_same_run(summary, expected)


def test_two_processes_of_the_command_give_the_one_process_run(fashion_dir, tmp_path, one_process):
    out = tmp_path / "run"
    logs = finish(start_processes(command_args(fashion_dir, out)), COMMAND_TIMEOUT_S)
    assert all("final test accuracy" in log for log in logs)
    assert_same_summary(json.loads((out / "summary.json").read_text()), one_process)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # written once, by process 0


@pytest.mark.slow  # a minute on 2 cores
def test_both_processes_killed_in_epoch_2_resume_to_the_one_process_run(fashion_dir, tmp_path,
                                                                         one_process):
    out = tmp_path / "run"
    procs = start_processes(command_args(fashion_dir, out))
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    while not (out / "checkpoints" / "1").is_dir():  # orbax renames a checkpoint when complete
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
        assert time.monotonic() < deadline, "no checkpoint after epoch 1"
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()
    assert not (out / "checkpoints" / "2").exists()  # killed in epoch 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    finish(start_processes(command_args(fashion_dir, out, "--resume")), COMMAND_TIMEOUT_S)
    assert_same_summary(json.loads((out / "summary.json").read_text()), one_process)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
