"""Integration tests touch the real kernel: every test in this directory is a `root` test.

Marking them here (instead of in each module) means a new test file cannot forget the
marker, and so cannot escape the sandbox gate in tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every item collected from this directory (tree) as `root`.

    This hook sees the whole session's items, not only this directory's: filter by path.
    tryfirst: mark before `-m` selection runs, so `-m root` / `-m "not root"` see it.
    """
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.root)
