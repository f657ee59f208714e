"""mergekit-qp: calibration-aware merging methods for mergekit.

Importing this package is cheap; `register()` loads mergekit and the methods.
"""

__version__ = "0.1.0"


def register() -> None:
    """Make `output_qp` available to mergekit and install its planner checks (idempotent)."""
    from .plugin import register as _register

    _register()


def statistics(model: str, calibration: str, out: str, *, base: str = None, samples: int = 128, seq_len: int = 512,
               seed: int = 0, packing: bool = False, field: str = None, statistics_dtype: str = "float32",
               device: str = "cpu", trust_remote_code: bool = False) -> dict:
    """Compute the output_qp statistics of the model folder `model` on `calibration` into the
    artifact folder `out` (docs/artifacts.md) and return its card; what `mergekit-qp statistics`
    runs. The settings are the merge's calibration_* parameters, with the same defaults."""
    import torch

    from .calibration.artifact import produce_artifact
    from .calibration.cache import CalibrationSettings
    from .calibration.data import CalibrationSource

    settings = CalibrationSettings(samples=samples, seq_len=seq_len, seed=seed, field=field, packing=packing,
                                   gram_dtype=statistics_dtype)
    return produce_artifact(model, CalibrationSource(path=calibration, field=field), out, settings, base_dir=base,
                            device=torch.device(device), trust_remote_code=trust_remote_code)


__all__ = ["register", "statistics", "__version__"]
