"""The notebooks, executed by a real Jupyter kernel (nbclient), as a user runs them: inside the
checkout (the install cell finds it), failing on any cell error and on a plot cell (tag ``plot``)
without an image."""
import json
import pathlib

import nbclient
import nbformat
import pytest
from fashion_files import make_fashion_dir

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "experiments"


def load(name: str, source: str | None = None):
    """The committed notebook ``name`` without its outputs (``source``: what its install cell's
    ``SOURCE`` is set to)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    if source is not None:
        install = notebook.cells[1]
        assert 'SOURCE = ""' in install.source
        install.source = install.source.replace('SOURCE = ""', f"SOURCE = {source!r}")
    return notebook


def execute(notebook, cwd: pathlib.Path):
    """Executes ``notebook`` in place in a fresh kernel started in ``cwd``; raises
    ``CellExecutionError`` at the first failing cell, leaving the later ones unexecuted."""
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def text(cell) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/markdown", ""))
                   for o in cell.get("outputs", []))


def assert_plots_drawn(notebook):
    plots = [c for c in notebook.cells if "plot" in c.metadata.get("tags", [])]
    assert plots, "the notebook has plot cells"
    for cell in plots:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source[:80]


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    return make_fashion_dir(tmp_path_factory.mktemp("fashion"), 512, 128)


@pytest.mark.slow  # 50 s; the committed executed notebook's outputs are checked in the default tier
def test_colab_notebook_installs_from_the_checkout_trains_and_plots(fashion_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("PFA_JAX_NOTEBOOK_SMOKE", "1")  # 512 images, 32-unit layers, 2 epochs
    monkeypatch.setenv("PFA_JAX_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PFA_JAX_FASHION_MNIST_DIR", str(fashion_dir))
    notebook = execute(load("colab.ipynb"), NOTEBOOKS)
    assert f"pfa_jax from the checkout {ROOT}" in text(notebook.cells[1])
    assert "runtime: CPU" in text(notebook.cells[2])
    assert f"Fashion-MNIST from the IDX files in {fashion_dir}" in text(notebook.cells[2])
    assert "pfa: final test accuracy" in text(notebook.cells[3])
    assert "vit pfa: final test accuracy" in text(notebook.cells[7])
    assert_plots_drawn(notebook)
    records = (tmp_path / "runs" / "colab-pfa" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in records] == [1, 2]
    vit = json.loads((tmp_path / "runs" / "colab-vit-pfa" / "summary.json").read_text())
    assert "block_1/attention/query" in vit["alignment"]


def test_colab_notebook_stops_when_the_install_fails(tmp_path):
    """Outside a checkout, a SOURCE that pip cannot install stops the notebook at the install
    cell, saying what to set."""
    notebook = load("colab.ipynb", source=str(tmp_path / "no-such-checkout"))
    with pytest.raises(nbclient.exceptions.CellExecutionError,
                       match="Set SOURCE at the top of this cell"):
        execute(notebook, tmp_path)
    later = [c for c in notebook.cells[2:] if c.cell_type == "code"]
    assert all(c.execution_count is None for c in later)


def test_expansion_figure_notebook_draws_from_the_committed_runs():
    notebook = execute(load("expansion_figure.ipynb"), NOTEBOOKS)
    table = text(notebook.cells[2])
    assert table.startswith("|") and "| 50 |" in table.replace("| r=50 |", "| 50 |")
    assert_plots_drawn(notebook)


@pytest.mark.parametrize("name", ["colab.ipynb", "expansion_figure.ipynb"])
def test_committed_notebooks_carry_their_outputs(name):
    """The notebooks are committed executed, so their outputs (images included) can be read in
    the repository without running them."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert_plots_drawn(notebook)
