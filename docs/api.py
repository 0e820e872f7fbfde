"""Writes pfa_jax's API reference (every module's docstrings, the library and ``pfa_jax.app``) as
HTML pages, with pdoc.

    python docs/api.py [OUT]      # default: docs/api/ (not committed)

Any warning pdoc gives (a module that does not import, a docstring or signature it cannot read, a
broken cross-reference) is an error, so the test suite (``tests/test_docs.py``) catches a broken
reference.
"""
from __future__ import annotations

import pathlib
import pkgutil
import sys
import warnings

import pdoc
import pdoc.render

import pfa_jax

HERE = pathlib.Path(__file__).resolve().parent


def modules() -> list[str]:
    """Every module of the package, ``pfa_jax.app`` and each model's module included."""
    found = pkgutil.walk_packages(pfa_jax.__path__, "pfa_jax.")
    return ["pfa_jax", *sorted(m.name for m in found if not m.name.rsplit(".", 1)[-1].startswith("_"))]


def build(out: pathlib.Path) -> list[pathlib.Path]:
    """Renders the reference into ``out``; returns the pages written. Raises on any warning."""
    pdoc.render.configure(docformat="markdown", show_source=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # a package's spec also adds those of its modules that it lists: not a fault
        warnings.filterwarnings("ignore", "The module specification .* has already been added")
        pdoc.pdoc(*modules(), output_directory=out)
    return sorted(out.rglob("*.html"))


if __name__ == "__main__":
    pages = build(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "api")
    print(f"wrote {len(pages)} pages")
