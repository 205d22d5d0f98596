"""Where things are, stated once so a test file can move between the test folders without
counting `parents[...]`."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
"""The repository root (pyproject.toml, docker/, docs/, the packages)."""

DATA = REPO / "tests" / "data"
"""The real-text samples the tests ship (sources and licences in its README)."""


def pyproject() -> dict:
    """pyproject.toml, parsed (tomllib from Python 3.11; `tomli` on 3.10, else the test skips)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs `tomli` "
                                      "(tomllib is in the standard library from 3.11)")
    return tomllib.loads((REPO / "pyproject.toml").read_text())
