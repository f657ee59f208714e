"""The state of one output_qp merge: created when the merge is planned (plugin/planning.py),
handed to every planned output_qp task as its `merge_state` argument, and read back by the
writer for the report. Nothing of a merge lives in module globals."""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..calibration.cache import STATISTICS, CalibrationSettings, StatisticsCache
from ..core.problems import SharedSystems, SolveSettings
from ..reports import merge_report
from . import compat
from .parameters import MERGE_STATE


class MergeState:
    """Statistics handles, per-tensor records for the report, the parked half of joint
    weight/bias solves, and the settings the report states."""

    def __init__(self, statistics: StatisticsCache = STATISTICS, *, device: str = "cpu",
                 trust_remote_code: bool = False, vocabulary_permuted: bool = False,
                 tied_head: Optional[str] = None,
                 report_settings: Optional[Dict[str, Any]] = None):
        self.statistics = statistics
        self.device = device
        self.trust_remote_code = trust_remote_code
        # mergekit re-orders embedding rows when a tokenizer is merged; token statistics follow
        # each expert's own order, so they cannot be used then.
        self.vocabulary_permuted = vocabulary_permuted
        # The output head's module name where the base model ties it to the input embedding
        # (one tensor in the checkpoint, merged once, for both roles); None otherwise.
        self.tied_head: Optional[str] = tied_head
        self.report_settings = report_settings  # None: no report (a merge not planned by mergekit)
        self.records: List[Dict[str, Any]] = []
        self.tasks: Dict[str, None] = {}  # every expert merged, in order of first appearance
        # Sequential merging: the statistics of the stage being merged (see stage_statistics).
        self._stage = threading.local()
        self._pending: Dict[Tuple, Tuple[SolveSettings, Sequence[float], torch.Tensor]] = {}
        self.systems = SharedSystems()  # q/k/v, gate/up: one factorisation per shared input
        self._lock = threading.Lock()

    # -- statistics ------------------------------------------------------------------------------
    @property
    def stage_statistics(self) -> Optional[Dict[Tuple[str, str], Any]]:
        """Sequential merging: the statistics of the stage being merged, by (expert, module), set
        by the layer's step around the merge calls it makes on its thread ({} for tensors of no
        stage); None otherwise."""
        return getattr(self._stage, "statistics", None)

    @stage_statistics.setter
    def stage_statistics(self, value: Optional[Dict[Tuple[str, str], Any]]) -> None:
        self._stage.statistics = value

    def statistics_of(self, base, experts, params: Dict[str, Any], module: str) -> List[Any]:
        """Per expert, the statistics of `module` (None where there are none)."""
        if self.stage_statistics is not None:
            return [self.stage_statistics.get((str(e.id), module)) for e in experts]
        settings = CalibrationSettings.from_params(params)
        artifacts = params.get("statistics") or {}
        return [self.statistics.expert_statistics(e.id, base.id, params["calibration"][e.id], settings,
                                                  base.tensor.device, self.trust_remote_code,
                                                  artifact=artifacts.get(e.id)).lookup(module)
                for e in experts]

    # -- joint weight/bias solves --------------------------------------------------------------------
    def park(self, key: Tuple, settings: SolveSettings, weights: Sequence[float], tensor: torch.Tensor) -> None:
        with self._lock:
            self._pending[key] = (settings, tuple(weights), tensor)

    def take(self, key: Tuple) -> Optional[Tuple[SolveSettings, Sequence[float], torch.Tensor]]:
        with self._lock:
            return self._pending.pop(key, None)

    # -- report ----------------------------------------------------------------------------------------
    def record(self, record: Dict[str, Any]) -> None:
        with self._lock:
            self.records.append(record)

    def saw(self, tasks: Sequence[str]) -> None:
        with self._lock:
            for t in tasks:
                self.tasks.setdefault(t, None)

    def report(self) -> Optional[Dict[str, Any]]:
        """The merge report, or None for a merge without report settings."""
        if self.report_settings is None:
            return None
        with self._lock:
            records, tasks = list(self.records), list(self.tasks)
        return merge_report.build_report(records, tasks, self.report_settings)


def merge_state_of(task) -> Optional[MergeState]:
    """The state a planned tensor task carries (an output_qp task or a sequential tensor)."""
    state = getattr(task, "merge_state", None)
    if not isinstance(state, MergeState):
        state = compat.merge_task_parameter(task, MERGE_STATE)
    return state if isinstance(state, MergeState) else None
