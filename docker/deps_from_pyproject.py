"""Print the requirements of pyproject.toml (core + the given extras), one per line.

The images install these in a layer of their own, before the code is copied, so editing the
code does not reinstall the dependencies:

    python deps_from_pyproject.py pyproject.toml routing,train > requirements.txt

Standard library only (Python >= 3.11 for tomllib): it runs in the bare base image.
"""

from __future__ import annotations

import sys

import tomllib


def requirements(pyproject: str, extras: str = "") -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in filter(None, (e.strip() for e in extras.split(","))):
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(optional)}")
        reqs += optional[extra]
    return reqs


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    print("\n".join(requirements(*sys.argv[1:])))
