"""``pfa-jax train`` with an own model's factory (``model='package.module:callable'``): a plain
Flax model goes under the rule through ``with_rule``, a factory taking ``rule`` builds its own rule
layers; ``config.json`` records the factory, ``--resume`` continues exactly and refuses clearly
when the module cannot be imported."""
import importlib
import json
import pathlib
import re
import shlex
import sys
import textwrap

import pytest
import runs

from pfa_jax.app import cli

NETS = textwrap.dedent('''
    import flax.linen as nn
    import pfa_jax as pj

    class Plain(nn.Module):
        width: int
        num_classes: int

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
            return nn.Dense(self.num_classes, name="head")(x)

    def plain(num_classes, width=16):
        return Plain(width, num_classes)

    class Ruled(nn.Module):
        rule: object
        num_classes: int

        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(pj.nn.Dense(16, rule=self.rule)(x.reshape(x.shape[0], -1)))
            logits = pj.nn.Dense(self.num_classes, rule=self.rule, name="head")(x)
            return pj.nn.add_taps(self, logits)

    def ruled(rule, num_classes):
        return Ruled(rule, num_classes)

    class OwnMatmul(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("kernel", nn.initializers.lecun_normal(), (784, 10))
            return x.reshape(x.shape[0], -1) @ w

    def own_matmul():
        return OwnMatmul()

    from flax import nnx

    class NNXNet(nnx.Module):
        def __init__(self, width, num_classes, rngs):
            self.hidden = nnx.Linear(784, width, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)
            self.head = nnx.Linear(width, num_classes, rngs=rngs)

        def __call__(self, x):
            return self.head(self.drop(nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))))

    def nnx_net(num_classes, rngs, width=16):
        return NNXNet(width, num_classes, rngs)
''')


@pytest.fixture
def labnets(tmp_path, monkeypatch):
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "labnets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(folder))
    yield folder / "labnets.py"
    sys.modules.pop("labnets", None)


def args(fashion_dir, out, model, *extra):
    return ["train", "--model", model, "--epochs", "2", "--batch-size", "32", "--quiet",
            "--set", f"data_dir={fashion_dir}", "--out", str(out), *extra]


def test_a_plain_flax_factory_trains_under_the_rule_and_resumes_exactly(fashion_dir, tmp_path,
                                                                       labnets, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("--rule", "fa", "--set", "model_options.width=24")
    assert cli.main(args(fashion_dir, straight, "labnets:plain", *extra, "--epochs", "3")) == 0
    assert cli.main(args(fashion_dir, resumed, "labnets:plain", *extra)) == 0
    config = json.loads((resumed / "config.json").read_text())
    assert config["model"] == "labnets:plain" and config["model_options"] == {"width": 24}
    records = runs.records(straight)
    # both Dense layers of the unchanged model follow FA: an angle per layer, feedback not the kernel
    assert set(records[-1]["alignment"]) == {"Dense_0", "head"}
    assert records[-1]["alignment"]["head"]["weight_angle"] > 1.0
    assert cli.main(["train", "--resume", "--out", str(resumed), "--epochs", "3", "--quiet"]) == 0
    runs.assert_close(runs.records(resumed), records)
    # another model for a resumed run is refused, as for the registry's models
    assert cli.main(["train", "--resume", "--out", str(resumed), "--model", "labnets:ruled",
                     "--quiet"]) == 2
    assert "model='labnets:ruled': the run in" in capsys.readouterr().err


def test_an_nnx_factory_trains_under_the_rule_with_dropout_and_resumes_exactly(fashion_dir,
                                                                             tmp_path, labnets):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("--rule", "pfa", "--set", "rule.options.expansion=2", "--set", "seed=3")
    assert cli.main(args(fashion_dir, straight, "labnets:nnx_net", *extra, "--epochs", "3")) == 0
    assert cli.main(args(fashion_dir, resumed, "labnets:nnx_net", *extra)) == 0
    records = runs.records(straight)
    assert set(records[-1]["alignment"]) == {"hidden", "head"}
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert cli.main(["train", "--resume", "--out", str(resumed), "--epochs", "3", "--quiet"]) == 0
    runs.assert_close(runs.records(resumed), records)
    # another seed draws another network (the factory gets the run's seed)
    other = tmp_path / "other"
    assert cli.main(args(fashion_dir, other, "labnets:nnx_net", "--rule", "pfa", "--set",
                         "rule.options.expansion=2", "--epochs", "1")) == 0
    assert runs.records(other)[0]["train_loss"] != records[0]["train_loss"]


def test_a_factory_taking_rule_gets_the_rule_with_dfa_bound_to_the_classes(fashion_dir, tmp_path,
                                                                           labnets):
    out = tmp_path / "run"
    assert cli.main(args(fashion_dir, out, "labnets:ruled", "--rule", "dfa", "--epochs", "1")) == 0
    # the hidden layer gets DFA's e B (not bp's gradient), the output layer its own exact one
    angles = runs.records(out)[-1]["gradient_alignment"]
    assert angles["Dense_0"]["grad_angle"] > 10 and angles["head"]["grad_angle"] < 1e-3


def test_resume_refuses_a_factory_it_cannot_import_and_keeps_the_run(fashion_dir, tmp_path,
                                                                    labnets, capsys):
    out = tmp_path / "run"
    assert cli.main(args(fashion_dir, out, "labnets:plain", "--epochs", "1")) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    labnets.unlink()
    sys.modules.pop("labnets", None)
    importlib.invalidate_caches()
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "2", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "model='labnets:plain': cannot import 'labnets'" in error and "PYTHONPATH" in error
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("model, message", [
    ("labnets:missing", "'labnets' has no callable 'missing'"),
    ("labnets:own_matmul", "no rule reaches the kernel(s) ['kernel (of the top-level module)']"),
    ("labnets:plain", "unexpected keyword argument 'depth'"),
])
def test_bad_factories_are_named(fashion_dir, tmp_path, labnets, capsys, model, message):
    extra = ("--set", "model_options.depth=2") if model == "labnets:plain" else ()
    out = tmp_path / "run"
    assert cli.main(args(fashion_dir, out, model, "--rule", "fa", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_documented_own_model_example_runs(fashion_dir, tmp_path, monkeypatch):
    """docs/command.md "Your own model": its module, as mylab/nets.py, and its two commands (with
    this test's small data and run directory)."""
    page = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "command.md").read_text()
    section = page[page.index("## Your own model"):]
    module = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    commands = re.search(r"```\n(pfa-jax train.*?)```", section, re.S).group(1)
    (tmp_path / "mylab").mkdir()
    (tmp_path / "mylab" / "__init__.py").write_text("")
    (tmp_path / "mylab" / "nets.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    try:
        for line in commands.replace("\\\n", " ").strip().splitlines():
            argv = shlex.split(line)[1:]
            argv[argv.index("--out") + 1] = str(out)
            if "--resume" in argv:
                argv[argv.index("--epochs") + 1] = "2"
            else:
                argv += ["--epochs", "1", "--set", f"data_dir={fashion_dir}", "--set",
                         "model_options.width=32"]
            assert cli.main(argv + ["--quiet"]) == 0, line
    finally:
        for name in ("mylab", "mylab.nets"):
            sys.modules.pop(name, None)
    assert len(runs.records(out)) == 2
    assert json.loads((out / "config.json").read_text())["model"] == "mylab.nets:mlp"
