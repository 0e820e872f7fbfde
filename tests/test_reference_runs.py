"""The papers' configs give the numbers recorded before the research-code rework
(``records/reference_runs.json``, written by ``reference_runs.py`` from the code of commit 75ba5dc),
to float rounding. Two runs are in the default tier; the rest run with ``-m slow``."""
import json

import numpy as np
import pytest
import reference_runs

RECORD = json.loads(reference_runs.RECORD.read_text())
FAST = {"fig2_fashion_mnist/pfa-seed0/model=lenet", "fig2_fashion_mnist/dfa-seed0"}


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    return {prefix: tree}


@pytest.mark.parametrize("spec", [
    pytest.param(spec, marks=() if "/".join([spec[0], spec[1], *spec[2]]) in FAST
                 else pytest.mark.slow, id="/".join([spec[0], spec[1], *spec[2]]))
    for spec in reference_runs.RUNS])
def test_paper_config_matches_the_stored_record(spec, monkeypatch):
    monkeypatch.setattr(reference_runs, "RUNS", [spec])
    (key, got), = reference_runs.run_all().items()
    want, got = _flat(RECORD[key]), _flat(got)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        tolerance = 0.02 if name.endswith("angle") else 1e-5  # angles in degrees
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=tolerance, err_msg=name)
