"""Everything under tests/e2e/ starts processes (tritonserver, `monolith-rt serve`, the trainer,
table writers and readers): all of it is marked slow, so `pytest -m "not slow"` is the quick loop."""

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)
