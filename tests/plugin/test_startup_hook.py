"""The installed start-up hook: nothing heavy at interpreter start, and output_qp registered
and the planner patched whatever order mergekit's modules are imported in."""

import os
import subprocess
import sys

import pytest



def python(code: str, **env_extra) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MERGEKIT_QP_NO_AUTOLOAD")}
    env.update(env_extra)
    # Run outside the source tree so that the installed package is what is imported.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_interpreter_start_imports_nothing_heavy():
    out = python("import sys; print(sorted(m for m in ('_mergekit_qp_autoload', 'mergekit', 'mergekit_qp', 'torch') "
                 "if m in sys.modules))")
    assert out == "['_mergekit_qp_autoload']", "the hook must be installed (pip install .) and import nothing else"


@pytest.mark.parametrize("first", ["mergekit.plan", "mergekit.merge", "mergekit.merge_methods", "mergekit_qp.plugin"])
def test_registered_and_patched_in_any_import_order(first):
    out = python(
        f"import {first}\n"
        "import mergekit.merge_methods as mm, mergekit.plan as plan\n"
        "mm.get('ties')  # what MergePlanner does first\n"
        "print('output_qp' in [m.spec.name for m in mm.registered_methods()],"
        " plan.MergePlanner.normalize_config.__module__)"
    )
    assert out == "True mergekit_qp.plugin.planning"


def test_opt_out_leaves_mergekit_untouched():
    out = python("import mergekit.merge_methods as mm, mergekit.plan as plan; mm.get('ties');"
                 "print('output_qp' in [m.spec.name for m in mm.registered_methods()],"
                 " plan.MergePlanner.normalize_config.__module__)", MERGEKIT_QP_NO_AUTOLOAD="1")
    assert out == "False mergekit.plan"


def test_a_mergekit_of_another_shape_is_refused(monkeypatch):
    """Every private symbol of compat.PRIVATE_API is checked; a drifted one disables output_qp
    with a message naming it."""
    from mergekit.io.tasks import TensorWriterTask
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.plan import MergePlanner

    from mergekit_qp.plugin import compat

    assert compat.mismatches() == []  # the installed mergekit passes
    compat.check_mergekit()

    def plan_tensor(self, weight, weights_in, models, cfg_reader, extra):
        pass

    def plan_layer(self, sources, layer_offset, cfg_reader, module_name):
        pass

    def _plan(self, out_path):
        pass

    for name, replacement in (("plan_tensor", plan_tensor), ("plan_layer", plan_layer), ("_plan", _plan)):
        with monkeypatch.context() as patch:
            patch.setattr(MergePlanner, name, replacement)
            with pytest.raises(RuntimeError, match=f"mergekit.plan.MergePlanner.{name} takes .* output_qp is disabled"):
                compat.check_mergekit()
    with monkeypatch.context() as patch:
        patch.delattr(TensorWriterTask, "__annotations__", raising=False)
        patch.setattr(TensorWriterTask, "model_fields", {}, raising=False)
        assert any("TensorWriterTask lacks out_path" in m for m in compat.mismatches())
    with monkeypatch.context() as patch:
        patch.setattr(ExecuteMergeMethodTask, "model_fields", {"method_name": None}, raising=False)
        patch.setattr(ExecuteMergeMethodTask, "__annotations__", {}, raising=False)
        assert any("ExecuteMergeMethodTask lacks" in m and "gather_tensors" in m for m in compat.mismatches())
    with monkeypatch.context() as patch:
        from mergekit.merge_methods import registry

        patch.delattr(registry, "_METHODS")
        assert any("registry._METHODS is missing" in m for m in compat.mismatches())
