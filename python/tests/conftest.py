"""Shared fixtures: the repository root and the `cage` binary the package is checked against."""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cli() -> str:
    """The release binary (scripts/test.sh builds it before the Python tests; CAGE_BIN overrides)."""
    path = os.environ.get("CAGE_BIN", str(ROOT / "target" / "release" / "cage"))
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: run cargo build --release first (scripts/test.sh does)")
    return path
