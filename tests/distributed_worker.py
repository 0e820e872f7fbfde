"""One process of the two-process data-parallel run in ``test_distributed.py`` (not a test itself).

    python tests/distributed_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz

Each process joins ``jax.distributed`` on ``localhost:PORT`` with CPU collectives (gloo) and two CPU
devices of its own, builds the same train state (same key), and runs ``STEPS`` jitted
``pfa_jax.train.train_step``s of ``ffn2`` with PFA over a global batch that is sharded over every
process's devices (``pfa_jax.train.batch_mesh`` over the global ``jax.devices()``): each process
holds only its own rows (``jax.make_array_from_process_local_data``) and the state is replicated
(``pfa_jax.train.replicate_on``, which sends the PRNG key as raw key data). Process 0 writes the
final params and feedback to ``OUT.npz``.
"""
from __future__ import annotations

import os
import sys

LOCAL_DEVICES = 2
STEPS = 3
GLOBAL_BATCH = 32
RULE = "pfa"


def batches(steps: int = STEPS, batch: int = GLOBAL_BATCH, seed: int = 0):
    """The global batches of the run (numpy, identical on every process and in the reference)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(batch, 28, 28, 1)).astype(np.float32),
             "label": rng.integers(0, 10, size=batch).astype(np.int32)} for _ in range(steps)]


def initial_state(pj, jax):
    model = pj.models.get("ffn2", rule=RULE, widths=(64, 32))
    return pj.train.create_train_state(jax.random.key(0), model, batches()[0]["image"][:1],
                                       {"learning_rate": 0.05, "weight_decay": 1e-3})


def flat(tree) -> dict:
    """``{'params/hidden_0/kernel': array, ...}`` for np.savez."""
    import jax
    import numpy as np

    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def main(port: str, process_id: str, num_processes: str, out: str) -> None:
    process_id, num_processes = int(process_id), int(num_processes)
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    import pfa_jax as pj

    assert jax.process_count() == num_processes, jax.process_count()
    assert jax.device_count() == num_processes * LOCAL_DEVICES, jax.devices()
    mesh = pj.train.batch_mesh()  # every process's devices, in jax.devices() order
    rows = NamedSharding(mesh, PartitionSpec(pj.train.AXIS))
    state = pj.train.replicate_on(initial_state(pj, jax), mesh)
    step = jax.jit(pj.train.train_step)
    per_process = GLOBAL_BATCH // num_processes
    own = slice(process_id * per_process, (process_id + 1) * per_process)
    for batch in batches():
        local = {k: v[own] for k, v in batch.items()}
        state, metrics = step(state, jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(rows, x), local))
    result = multihost_utils.process_allgather(
        {"params": state.params, "feedback": state.feedback, "loss": metrics["loss"]}, tiled=True)
    if process_id == 0:
        np.savez(out, **flat(result))
    jax.distributed.shutdown()


if __name__ == "__main__":
    # The test process's XLA_FLAGS (tests/conftest.py: 4 host devices) must not leak in here.
    os.environ.pop("XLA_FLAGS", None)
    main(*sys.argv[1:])
