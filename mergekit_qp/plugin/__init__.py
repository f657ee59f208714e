"""Everything that touches mergekit (the only package that imports it): the `output_qp` method
and `<method>_svc` methods, their registration, the planner and output patches, and the graph
tasks of sequential merging. Private mergekit symbols are named in compat.py only."""

from .api import CalibrationProblem, calibration_problem, diagnose, spectrum
from .config_api import (UnknownMergeMethod, load_merge_config, method_ignores_base_model, method_parameter_specs,
                         run_mergekit_yaml)
from .config_checks import check_config
from .method import METHOD, OutputQPMerge
from .planning import patch_mergekit
from .registration import register, register_method, unregister_method

__all__ = ["CalibrationProblem", "METHOD", "OutputQPMerge", "UnknownMergeMethod", "calibration_problem", "check_config",
           "diagnose", "load_merge_config", "method_ignores_base_model", "method_parameter_specs", "patch_mergekit",
           "run_mergekit_yaml",
           "register", "register_method", "spectrum", "unregister_method"]

# The start-up hook fires while this package is still importing mergekit (when user code
# imports mergekit_qp before mergekit); it then leaves its callback here to finish the job.
_callback = globals().pop("_register_when_loaded", None)
if _callback is not None:
    _callback()
