"""Adding output_qp and the `<method>_svc` methods to mergekit's registry (idempotent), and
taking them out again when mergekit's planner cannot be patched safely."""

from __future__ import annotations

import threading

from . import compat
from .method import METHOD
from .parameters import METHOD_NAME
from .planning import patch_mergekit
from .svc_methods import SVC_INNER, svc_methods

_lock = threading.Lock()
_registered = False


def register_method() -> None:
    """Add `output_qp` and the `<method>_svc` twins to mergekit's registry (idempotent)."""
    global _registered
    from mergekit.merge_methods import registry

    with _lock:
        if not _registered:
            present = {m.spec.name for m in registry.registered_methods()}
            for method in (METHOD, *svc_methods()):
                if method.spec.name not in present:
                    registry.register(method)
        _registered = True


def unregister_method() -> None:
    """Take our methods out again (mergekit has no public unregister)."""
    global _registered
    with _lock:
        compat.unregister((METHOD_NAME, *(f"{inner}_svc" for inner in SVC_INNER)))
        _registered = False


def register() -> None:
    """Make `output_qp` available to mergekit and patch its planner (idempotent)."""
    register_method()
    try:
        patch_mergekit()
    except RuntimeError:
        unregister_method()
        raise
