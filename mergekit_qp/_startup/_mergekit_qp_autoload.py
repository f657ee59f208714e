"""Start-up hook of mergekit-qp: makes `merge_method: output_qp` work in the stock
`mergekit-yaml`, `mergekit-multi` and mergekit's Python API without a wrapper.

Installed as site-packages/_mergekit_qp_autoload.py and run at interpreter start by
mergekit_qp.pth (Python < 3.15) or mergekit_qp.start (PEP 829, Python >= 3.15). It imports
nothing heavy: it only waits, on sys.meta_path, for mergekit's merge-method package to be
imported, then registers the methods. The planner patches are installed the first time a
method is looked up with mergekit.plan complete (MergePlanner looks its method up first
thing), whichever order mergekit's modules were imported in.
Set MERGEKIT_QP_NO_AUTOLOAD=1 to switch it off (then call mergekit_qp.register() yourself,
or run `mergekit-qp yaml`).
"""

import os
import sys

_WATCHED = "mergekit.merge_methods"


def _report(error):
    sys.stderr.write(f"mergekit-qp: output_qp is not available: {error}\n")


def _register():
    partial = sys.modules.get("mergekit_qp.plugin")
    if partial is not None and not hasattr(partial, "register_method"):
        # mergekit_qp.plugin is itself importing mergekit: it calls back when it is complete.
        partial._register_when_loaded = _register
        return
    try:
        from mergekit_qp import plugin

        plugin.register_method()
    except Exception as error:  # never break mergekit itself; say why output_qp is missing
        _report(repr(error))
        return
    _patch_before_planning()


def _patch_before_planning():
    methods = sys.modules[_WATCHED]
    original_get = methods.get

    def get(name):
        plan = sys.modules.get("mergekit.plan")
        if plan is not None and hasattr(plan, "MergePlanner"):
            methods.get = original_get  # once is enough
            from mergekit_qp import plugin

            try:
                plugin.patch_mergekit()
            except Exception as error:  # a planner it cannot patch safely: no output_qp at all
                plugin.unregister_method()
                _report(error)
        return original_get(name)

    methods.get = get


class _Finder:
    """A meta-path finder that finds nothing itself: it wraps the real loader of the watched
    module so that the registration runs right after the module has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec

        def exec_module(module):
            del loader.exec_module  # the loader's own method again, for anything it loads later
            type(loader).exec_module(loader, module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            _register()

        loader.exec_module = exec_module
        return spec


def install():
    """Arm the hook (idempotent); does nothing when MERGEKIT_QP_NO_AUTOLOAD is set."""
    if os.environ.get("MERGEKIT_QP_NO_AUTOLOAD", "").strip() not in ("", "0"):
        return
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if _WATCHED in sys.modules:  # installed late (e.g. by hand): register now
        _register()
        return
    sys.meta_path.insert(0, _Finder())
