import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption(
        "--update-goldens", action="store_true", help="rewrite tests/golden/ from the current output; review the diff"
    )


@pytest.fixture
def update_goldens(request) -> bool:
    return request.config.getoption("--update-goldens")


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root, so that paths print as `pipelines/x.dsg`."""
    monkeypatch.chdir(ROOT)
    return ROOT


os.environ.setdefault("PYTHONHASHSEED", "0")
