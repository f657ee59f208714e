"""Public functions over mergekit's configuration, its registry of merge methods and its
`mergekit-yaml` command, for the commands in cli/ (which never import mergekit themselves).

mergekit is imported inside each function (public mergekit API only), after mergekit-qp's
methods are registered, so that `output_qp` and the `<method>_svc` methods are known.
"""

from __future__ import annotations

import os
from typing import Any, List, Mapping, Sequence, Union


class UnknownMergeMethod(LookupError):
    """A merge method name that mergekit's registry does not hold; `known` lists those it does."""

    def __init__(self, name: str, known: Sequence[str]):
        self.name, self.known = name, sorted(known)
        super().__init__(f"unknown merge method {name!r}")


def load_merge_config(source: Union[str, "os.PathLike[str]", Mapping[str, Any]]):
    """A mergekit MergeConfiguration, validated by mergekit, from a YAML file or an already-read
    dict. mergekit's validation error propagates."""
    import yaml
    from mergekit.config import MergeConfiguration

    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        with open(source, encoding="utf-8") as fp:
            raw = yaml.safe_load(fp)
    return MergeConfiguration.model_validate(raw)


def registered_method(name: str):
    from mergekit.merge_methods import registry

    from .registration import register

    register()
    try:
        return registry.get(name)
    except RuntimeError:
        raise UnknownMergeMethod(name, [m.spec.name for m in registry.registered_methods()]) from None


def method_parameter_specs(name: str) -> List[Any]:
    """The parameters of the registered merge method `name` (mergekit ParameterSpec objects:
    name, required, default, scope, validate); raises UnknownMergeMethod."""
    return list(registered_method(name).spec.parameters)


def method_ignores_base_model(name: str) -> bool:
    """Whether the merge method `name` takes no base model (e.g. linear: a base in its config
    would be averaged in as one more model); raises UnknownMergeMethod."""
    from mergekit.merge_methods.base import BasePolicy

    return registered_method(name).spec.contract.base == BasePolicy.IGNORED


def run_mergekit_yaml(argv: Sequence[str], prog_name: str = "mergekit-yaml") -> None:
    """mergekit's own `mergekit-yaml` command on `argv` (CONFIG OUT [options]), in this process,
    with mergekit-qp's methods registered. Exits as the command does (SystemExit)."""
    from .registration import register

    register()
    from mergekit.scripts.run_yaml import main

    main.main(args=list(argv), prog_name=prog_name)
