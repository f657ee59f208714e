"""Loading what calibration runs: a model folder from a mergekit reference, the base model's
tokenizer, and a checkpoint as its own transformers class (no mergekit import)."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch

from .store import bytes_fingerprint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
                   "special_tokens_map.json")


def local_model_path(model) -> str:
    """A mergekit ModelReference (or a path) as a local folder, or a clear error."""
    if isinstance(model, str):
        if not os.path.isdir(model):
            raise ValueError(f"output_qp: input {model!r} is not a model folder, so calibration cannot run it: "
                             "identify each input by its model folder (or a mergekit model reference)")
        return model
    if getattr(model, "lora", None) is not None:
        raise ValueError(
            f"output_qp: {model} is a LoRA reference; merge the adapter into a checkpoint first "
            "so that calibration runs the model that is merged"
        )
    reference = getattr(model, "model", None)
    if reference is None or not hasattr(reference, "path"):
        raise ValueError(
            f"output_qp: input {model!r} is not a model folder or a mergekit model reference, so calibration "
            "cannot run it: identify each input by its model folder (e.g. merge_state_dicts({'/path/to/expert': "
            "state_dict, ...}, 'output_qp', base='/path/to/base', parameters={'calibration': ...}))")
    path = reference.path
    if os.path.isdir(path):
        return path
    try:
        return model.local_path()
    except Exception as error:
        raise ValueError(f"output_qp: model {path!r} is not a local folder and could not be fetched: {error}") from None


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    """The base model's tokenizer, or None when the folder has none."""
    from transformers import AutoTokenizer

    if not any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)


def tokenizer_fingerprint(model_dir: str) -> str:
    files = [os.path.join(model_dir, f) for f in TOKENIZER_FILES if os.path.exists(os.path.join(model_dir, f))]
    return bytes_fingerprint(files) if files else "none"


def model_class_for(config):
    """The checkpoint's own transformers class (so module names match tensor names)."""
    import transformers

    return next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)),
                transformers.AutoModel)


def meta_model(config, trust_remote_code: bool = False) -> torch.nn.Module:
    """The checkpoint's own class for `config`, on the meta device (no memory for weights)."""
    import transformers

    model_class = model_class_for(config)
    with torch.device("meta"):
        if model_class is transformers.AutoModel:
            return transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        return model_class(config)


def load_model(model_dir: str, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    """The checkpoint as its own transformers class, in float32."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    model = model_class_for(config).from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    return model.to(device=device, dtype=torch.float32).eval()


def output_head(model) -> Optional[str]:
    """The name of the output head (lm_head), whose input is the last statistic a pass needs."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)
