"""The package layout's rules, read from the source with `ast` (docs/architecture.md):
core imports torch only; calibration and reports never import mergekit; only plugin imports
mergekit, and only plugin/compat.py names a private mergekit symbol; no module over ~450 lines."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_qp"
STANDARD = {"__future__", "abc", "collections", "contextlib", "copy", "dataclasses", "difflib", "functools",
            "hashlib", "importlib", "inspect", "itertools", "json", "logging", "math", "os", "re", "tempfile",
            "threading", "typing", "uuid", "warnings"}


def modules(package: str):
    return sorted((PACKAGE / package).rglob("*.py"))


def imports(path: Path, package: Path = PACKAGE):
    """(top-level module, full dotted name, imported names) of every import, relative ones
    resolved against the package."""
    tree = ast.parse(path.read_text(), str(path))
    parts = path.relative_to(package.parent).with_suffix("").parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[: len(parts) - node.level]) if path.name != "__init__.py" else \
                    list(parts[: len(parts) - node.level + 1])
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield name.split(".")[0], name, [a.name for a in node.names]


def test_core_imports_torch_only():
    for path in modules("core"):
        for top, name, _ in imports(path):
            assert top in STANDARD | {"torch"} or name.startswith("mergekit_qp.core"), f"{path.name} imports {name}"


@pytest.mark.parametrize("package", ["calibration", "reports", "cli", "core"])
def test_only_plugin_imports_mergekit(package):
    for path in modules(package):
        for top, name, _ in imports(path):
            assert top != "mergekit", f"{package}/{path.name} imports {name}"
            assert not name.startswith("mergekit_qp.plugin") or package == "cli", f"{path.name} imports {name}"


def test_calibration_and_reports_stay_below_plugin_and_cli():
    for package in ("calibration", "reports"):
        for path in modules(package):
            for _, name, _ in imports(path):
                assert not name.startswith(("mergekit_qp.plugin", "mergekit_qp.cli")), f"{path} imports {name}"


def private_names():
    from mergekit_qp.plugin.compat import PRIVATE_API

    names = set()
    for entry in PRIVATE_API:
        names.update(part for part in entry.path.split(".") if part.startswith("_"))
        names.update(f for f in entry.fields if f.startswith("_"))
        names.add(entry.path.split(".")[0])  # the class or function itself
    # Public names of mergekit that the table lists only for a signature check.
    return names - {"get", "MergePlanner", "WeightInfo"}


def test_only_compat_names_private_mergekit_symbols():
    private = private_names()
    assert {"_tensors", "_METHODS", "_plan", "LoaderCache", "ExecuteMergeMethodTask", "FinalizeModel"} <= private
    for path in modules("plugin"):
        if path.name == "compat.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            named = None
            if isinstance(node, ast.Attribute):
                named = node.attr
            elif isinstance(node, ast.Name):
                named = node.id
            elif isinstance(node, ast.alias):
                named = node.name.split(".")[-1]
            assert named not in private, f"plugin/{path.name}:{getattr(node, 'lineno', '?')} names {named}"


def test_no_module_is_over_450_lines():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 460, f"{path.relative_to(PACKAGE)} has {lines} lines"


def test_the_checker_catches_a_violation(tmp_path):
    """The import walk resolves relative imports: a core module importing the plugin, or
    mergekit, is seen as such."""
    probe = tmp_path / "mergekit_qp" / "core" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..plugin import compat\nfrom . import qp\nimport mergekit.plan\n")
    found = [name for _, name, _ in imports(probe, tmp_path / "mergekit_qp")]
    assert found == ["mergekit_qp.plugin", "mergekit_qp.core", "mergekit.plan"]
