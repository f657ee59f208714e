"""Start-up hook of mergekit-qp: makes `merge_method: output_qp` work in the stock
`mergekit-yaml`, `mergekit-multi` and mergekit's Python API without a wrapper.

Installed as site-packages/_mergekit_qp_autoload.py and run at interpreter start by
mergekit_qp.pth (Python < 3.15) or mergekit_qp.start (PEP 829, Python >= 3.15). It imports
nothing heavy: it only waits, on sys.meta_path, for mergekit's merge-method package to be
imported, then registers the methods; the planner patches wait for mergekit.plan.
Set MERGEKIT_QP_NO_AUTOLOAD=1 to switch it off (then call mergekit_qp.register() yourself,
or run `mergekit-qp yaml`).
"""

import os
import sys

_REGISTER_AFTER = "mergekit.merge_methods"
_PATCH_AFTER = "mergekit.plan"


def _report(error):
    sys.stderr.write(f"mergekit-qp: could not register its merge methods: {error!r}\n")


def _register():
    partial = sys.modules.get("mergekit_qp.plugin")
    if partial is not None and not hasattr(partial, "register_method"):
        # mergekit_qp.plugin is itself importing mergekit: it calls back when it is complete.
        partial._register_when_loaded = _register
        return
    try:
        from mergekit_qp import plugin

        plugin.register_method()
        plan = sys.modules.get(_PATCH_AFTER)
        if plan is not None and hasattr(plan, "MergePlanner"):
            plugin.patch_mergekit()
        else:
            _Finder.watch[_PATCH_AFTER] = _patch
    except Exception as error:  # never break mergekit itself; say why output_qp is missing
        _report(error)


def _patch():
    try:
        from mergekit_qp import plugin

        plugin.patch_mergekit()
    except Exception as error:
        _report(error)


class _Finder:
    """A meta-path finder that finds nothing itself: it wraps the real loader of a watched
    module so that a callback runs right after the module has executed."""

    watch = {}

    def find_spec(self, name, path=None, target=None):
        callback = self.watch.get(name)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        del self.watch[name]
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            callback()

        spec.loader.exec_module = exec_module
        return spec


def install():
    """Arm the hook (idempotent); does nothing when MERGEKIT_QP_NO_AUTOLOAD is set."""
    if os.environ.get("MERGEKIT_QP_NO_AUTOLOAD", "").strip() not in ("", "0"):
        return
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if _REGISTER_AFTER in sys.modules:  # installed late (e.g. by hand): register now
        _register()
        return
    _Finder.watch[_REGISTER_AFTER] = _register
    sys.meta_path.insert(0, _Finder())
