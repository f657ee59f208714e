import os
import sys

# tests/ holds shared builders (tiny_models.py), and some test modules share helpers with
# others (test_end_to_end.run, test_plugin.merge): every test folder is importable.
_HERE = os.path.dirname(__file__)
for _folder in ("", "core", "calibration", "plugin", "cli", "e2e"):
    sys.path.insert(0, os.path.join(_HERE, _folder))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e (subprocess merges, benchmark smoke runs) is the slow tier."""
    import pytest

    e2e = os.path.join(_HERE, "e2e") + os.sep
    for item in items:
        if str(item.fspath).startswith(e2e):
            item.add_marker(pytest.mark.slow)
