"""Helpers of the tests that train whole runs: the tiny schedule, a run's records and TensorBoard
scalars read back, and runs compared."""
import json

import numpy as np
import pytest
from flax import traverse_util

TINY = ["epochs=2", "batch_size=32", "optimizer.lr_milestones=()", "metrics_batch_size=32",
        "sharpness.examples=64", "sharpness.iterations=3", "sharpness.probes=2",
        "robustness.examples=64", "robustness.pgd_steps=2", "eval_batch_size=100"]


def records(out):
    """metrics.jsonl without the wall-clock field."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_time"} for line in lines]


def assert_close(a, b):
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close(a[key], b[key])
    else:
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


def scalars(out) -> dict:
    """``{tag: [(step, value), ...]}`` of a run's TensorBoard events, read by TensorBoard itself."""
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(out / "tensorboard"),
                                                size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def assert_same_run(many: dict, one: dict) -> None:
    """Angles to 0.01 degrees, loss, accuracy and every other figure to 1e-4 relative."""
    many, one = (traverse_util.flatten_dict(s, sep="/") for s in (many, one))
    assert set(many) == set(one)
    for key, value in one.items():
        if not isinstance(value, float) or "time" in key:
            continue
        if key.endswith("angle"):
            np.testing.assert_allclose(many[key], value, atol=0.01, err_msg=key)
        else:
            np.testing.assert_allclose(many[key], value, rtol=1e-4, atol=1e-7, err_msg=key)
