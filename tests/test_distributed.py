"""Multi-process data parallelism: two processes on localhost (``jax.distributed`` with CPU gloo
collectives, two CPU devices each) train ``ffn2`` with PFA on a batch sharded over all four devices,
and end with the same parameters and feedback as one process training on the whole batch."""
import os
import socket
import subprocess
import sys
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
    procs = [subprocess.Popen([sys.executable, worker.__file__, str(port), str(i), str(num_processes),
                               str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(num_processes)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"
    return dict(np.load(out))


def reference():
    """One process, one device, the whole global batch every step."""
    state = worker.initial_state(pj, jax)
    step = jax.jit(pj.train.train_step)
    for batch in worker.batches():
        state, metrics = step(state, jax.device_put(batch, jax.devices()[0]))
    return worker.flat({"params": state.params, "feedback": state.feedback,
                        "loss": metrics["loss"]})


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    distributed = run_workers(tmp_path)
    expected = reference()
    assert sorted(distributed) == sorted(expected)
    assert any(k.endswith("/R") for k in expected)  # PFA's plastic feedback took part
    for name, value in expected.items():
        np.testing.assert_allclose(distributed[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    initial = worker.flat({"params": worker.initial_state(pj, jax).params})
    assert any(not np.allclose(initial[k], expected[k]) for k in initial)  # training moved them
