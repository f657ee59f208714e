"""Tensor access to a saved model folder (single-file or sharded safetensors)."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import safe_open


class Checkpoint:
    """Tensor access to a saved model folder (single file or sharded safetensors)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fp:
                files = json.load(fp)["weight_map"]
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
                files = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"no safetensors checkpoint in {directory}")
        self.directory = directory
        self.files = files

    def name(self, wanted: str) -> Optional[str]:
        """The stored name for a tensor name, tolerant of a model prefix (bert.…)."""
        if wanted in self.files:
            return wanted
        matches = sorted((k for k in self.files if k.endswith("." + wanted) or wanted.endswith("." + k)), key=len)
        return matches[0] if matches else None

    def get(self, wanted: str, required: bool = False) -> Optional[torch.Tensor]:
        key = self.name(wanted)
        if key is None:
            if required:
                raise KeyError(f"{self.directory} has no tensor {wanted}")
            return None
        with safe_open(os.path.join(self.directory, self.files[key]), "pt") as f:
            return f.get_tensor(key)
