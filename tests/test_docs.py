"""The documentation: the API reference builds from the docstrings without a warning, and every
relative link of README.md and docs/ (files and heading anchors) and every docs/ page the code
names exists."""
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in page.read_text().splitlines()
            if line.startswith("#")}


def test_anchor_follows_github():
    assert anchor(" Storage forms: PFA at Kolen-Pollack's cost") == \
        "storage-forms-pfa-at-kolen-pollacks-cost"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no file {linked})")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target} (no heading #{fragment} in {linked.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_the_code_names_exists():
    sources = [p for folder in ("pfa_jax", "experiments", "benchmarks")
               for p in (ROOT / folder).rglob("*.py")]
    named = {m for p in sources for m in re.findall(r"docs/[\w./-]+\.md", p.read_text())}
    assert named, "the docstrings point to docs/"
    assert sorted(n for n in named if not (ROOT / n).exists()) == []


def test_the_api_reference_builds_without_warnings(tmp_path):
    spec = importlib.util.spec_from_file_location("api", ROOT / "docs" / "api.py")
    api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api)
    pages = {p.relative_to(tmp_path).as_posix() for p in api.build(tmp_path)}
    # the library, the application and the modules that define the models all have pages
    assert {"pfa_jax.html", "pfa_jax/rules/product_feedback.html", "pfa_jax/app/spec.html",
            "pfa_jax/models/resnet.html", "pfa_jax/nnx/layers.html"} <= pages
    text = (tmp_path / "pfa_jax" / "rules" / "product_feedback.html").read_text()
    assert "G_MIN_EXPANSION" in text and "Storage forms" in text


def test_the_soft_alignment_page_quotes_the_report():
    """Every interval docs/soft_alignment.md quotes (``m ± h``, ``d [lo, hi]``) is in RESULTS.md,
    which experiments.report writes from the runs: the page cannot drift from them."""
    page = (ROOT / "docs" / "soft_alignment.md").read_text()
    report = (ROOT / "RESULTS.md").read_text()
    quoted = re.findall(r"-?\d+\.\d+ ± \d+\.\d+|-?\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]", page)
    assert len(quoted) > 20
    assert [q for q in quoted if q not in report] == []


# what a page's code prints that shows it did what it says
PRINTED = {"own_code.md": ("attention/query", "tag_loss"), "nnx.md": ("attention/query", "'head': 0.0"),
           "populations.md": ("0.9",)}


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs_as_written(page, capsys):
    """A page's python blocks, in order, as one program (each page is self-contained)."""
    code = "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
    exec(compile(code, str(page.relative_to(ROOT)), "exec"), {"__name__": "docs"})
    printed = capsys.readouterr().out
    for expected in PRINTED.get(page.name, ()):
        assert expected in printed, expected
