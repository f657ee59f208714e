"""What the plugin changes in mergekit's output writing (installed through compat.install).

For output_qp merges: the merge report is written once mergekit has finalised the model, and
the model card points to it. For EVERY merge method (documented in docs/architecture.md):
a config.json left in the output folder by an earlier model is removed when the merge starts
writing (mergekit writes it again when every tensor is saved), so a failed re-merge never looks
complete; and a failed shard write names the output folder.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from ..reports import merge_report
from . import compat
from .merge_state import merge_state_of
from .parameters import METHOD_NAME

LOG = logging.getLogger("mergekit_qp")


class OutputWriteError(RuntimeError):
    """Writing the merged model failed (disk full, file size limit, ...)."""


@contextmanager
def naming_output_folder(out_path: str):
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        raise OutputWriteError(
            f"writing the merged model into {out_path} failed: {error}. The folder is incomplete (mergekit writes "
            "config.json only after every tensor): free space or choose another output folder and merge again"
        ) from error


def write_merge_report(finalize) -> None:
    """merge_report.json / .md / .png of the output_qp merge that `finalize` completes (its
    state is found from its own tensor tasks; other merges have none)."""
    state = next((s for t in compat.save_task_outputs(finalize) if (s := merge_state_of(t)) is not None), None)
    report = state.report() if state is not None else None
    if report is None:
        return
    out_path = compat.writer_folder(finalize)
    try:
        merge_report.write_report(out_path, report)
    except OSError as error:
        # Every tensor is written: failing now would throw the merge away (mergekit writes
        # config.json next) for want of a report that can be recomputed. Say so loudly instead.
        LOG.error("output_qp: the merged model in %s is complete, but writing its merge report there failed: %s "
                  "(`mergekit-qp diagnose CONFIG %s` writes it later)", out_path, error, out_path)


def finalize_with_report(original):
    def execute(self, writer, **kwargs):
        with naming_output_folder(compat.writer_folder(self)):
            result = original(self, writer, **kwargs)
        write_merge_report(self)
        return result
    return execute


def save_naming_folder(original):
    def execute(self, writer, tensor):
        # A full shard is written here: name the folder when that fails (a full disk).
        with naming_output_folder(compat.writer_folder(self)):
            return original(self, writer, tensor)
    return execute


def writer_dropping_stale_config(original):
    def execute(self, **_kwargs):
        # A merge into a folder that holds an earlier model overwrites its shards one by one; if
        # it then fails, the old config.json would make the mix load as a model. The merge graph
        # opens its writer here, once planning is done (so a config error leaves the old model
        # whole): drop the marker, which mergekit writes again once every tensor is saved.
        stale = os.path.join(compat.writer_folder(self), "config.json")
        if os.path.isfile(stale):
            LOG.warning("mergekit-qp: %s held a model; its config.json is removed while the new merge writes "
                        "there and written again when the merge completes", compat.writer_folder(self))
            os.remove(stale)
        return original(self, **_kwargs)
    return execute


def card_with_report(original):
    def card(config, config_yaml, name=None):
        card_text = original(config, config_yaml, name)
        if config.merge_method == METHOD_NAME:
            card_text += (
                "\n\n## Residual energy captured\n\nThis model was merged with output_qp (mergekit-qp). "
                "`merge_report.md` (and `merge_report.json`) list, per layer, task and tensor, the share of "
                "the experts' output change on the calibration data that the merge keeps.\n"
            )
        return card_text
    return card


PATCHES = {
    "FinalizeModel.execute": finalize_with_report,
    "SaveTensor.execute": save_naming_folder,
    "TensorWriterTask.execute": writer_dropping_stale_config,
    "generate_card": card_with_report,
}
