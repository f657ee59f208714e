"""The installed start-up hook: nothing heavy at interpreter start, and output_qp registered
and the planner patched whatever order mergekit's modules are imported in."""

import os
import subprocess
import sys

import pytest

from mergekit_qp import plugin


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
    assert out == "True mergekit_qp.plugin"


def test_opt_out_leaves_mergekit_untouched():
    out = python("import mergekit.merge_methods as mm, mergekit.plan as plan; mm.get('ties');"
                 "print('output_qp' in [m.spec.name for m in mm.registered_methods()],"
                 " plan.MergePlanner.normalize_config.__module__)", MERGEKIT_QP_NO_AUTOLOAD="1")
    assert out == "False mergekit.plan"


def test_a_planner_of_another_shape_is_refused():
    class OtherPlanner:
        def normalize_config(self):
            pass

        def plan_tensor(self, weight, weights_in, models, cfg_reader, extra):
            pass

    with pytest.raises(RuntimeError, match="OtherPlanner.plan_tensor .* output_qp is disabled"):
        plugin.check_planner_api(OtherPlanner)
    from mergekit.plan import MergePlanner

    plugin.check_planner_api(MergePlanner)  # the installed mergekit passes

    # The hooks of sequential merging: the per-layer planning step and the final rewrite.
    class LayerPlannerDrift(MergePlanner):
        def plan_layer(self, sources, layer_offset, cfg_reader, module_name):
            pass

    with pytest.raises(RuntimeError, match="LayerPlannerDrift.plan_layer .* output_qp is disabled"):
        plugin.check_planner_api(LayerPlannerDrift)

    class PlanDrift(MergePlanner):
        def _plan(self, out_path):
            pass

    with pytest.raises(RuntimeError, match="PlanDrift._plan .* output_qp is disabled"):
        plugin.check_planner_api(PlanDrift)
