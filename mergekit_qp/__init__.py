"""mergekit-qp: calibration-aware merging methods for mergekit.

Importing this package is cheap; `register()` loads mergekit and the methods.
"""

__version__ = "0.1.0"


def register() -> None:
    """Make `output_qp` available to mergekit and install its planner checks (idempotent)."""
    from .plugin import register as _register

    _register()


__all__ = ["register", "__version__"]
