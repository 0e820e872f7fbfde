"""The user entry points' docstrings: each has ``Args:``, ``Returns:`` and an ``Example:`` whose
doctest runs here, and every module example in the library runs too."""
import doctest
import importlib
import pkgutil

import pytest

import pfa_jax as pj

ENTRY_POINTS = {
    "rules.get": pj.rules.get,
    "models.get": pj.models.get,
    "nn.Dense": pj.nn.Dense,
    "nn.with_rule": pj.nn.with_rule,
    "nnx.with_rule": pj.nnx.with_rule,
    "train.create_train_state": pj.train.create_train_state,
    "train.train_step": pj.train.train_step,
    "train.eval_step": pj.train.eval_step,
    "train.train_epoch": pj.train.train_epoch,
    "train.evaluate": pj.train.evaluate,
    "metrics.alignment": pj.metrics.alignment,
    "metrics.gradient_alignment": pj.metrics.gradient_alignment,
    "metrics.sharpness": pj.metrics.sharpness,
    "metrics.adversarial": pj.metrics.adversarial,
    "metrics.corruption": pj.metrics.corruption,
    "nnx.train_step": pj.nnx.train_step,
    "optim.scheduled": pj.optim.scheduled,
    "population.create": pj.population.create,
}


def _run(tests) -> doctest.TestResults:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    return runner.summarize(verbose=False)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_an_entry_point_documents_its_arguments_and_runs_its_example(name):
    entry = ENTRY_POINTS[name]
    text = entry.__doc__ or ""
    missing = [s for s in ("Args:", "Returns:", "Example:") if s not in text]
    assert not missing, f"{name}'s docstring lacks {missing}"
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(entry, name) if t.examples]
    assert tests, f"{name}'s example has no doctest"
    result = _run(tests)
    assert result.attempted and not result.failed


def _modules_with_examples():
    for info in pkgutil.walk_packages(pj.__path__, "pfa_jax."):
        module = importlib.import_module(info.name)
        if ">>>" in (module.__doc__ or ""):
            yield info.name


@pytest.mark.parametrize("name", sorted(_modules_with_examples()))
def test_a_module_example_runs(name):
    module = importlib.import_module(name)
    result = _run([t for t in doctest.DocTestFinder(recurse=False).find(module) if t.examples])
    assert result.attempted and not result.failed
