"""The `mergekit-qp` command: an explicit fallback to the start-up hook, and the demo."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="mergekit-qp")
def main() -> None:
    """Calibration-aware merging for mergekit (merge_method: output_qp)."""


@main.command(
    "yaml",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.pass_context
def yaml_command(ctx: click.Context) -> None:
    """mergekit-yaml with mergekit-qp's methods registered (same arguments and options).

    Needed only where the start-up hook is off (MERGEKIT_QP_NO_AUTOLOAD=1) or was not installed.
    """
    from . import register

    register()
    from mergekit.scripts.run_yaml import main as run_yaml

    run_yaml.main(args=list(ctx.args), prog_name="mergekit-qp yaml")


@main.command(
    "demo",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.pass_context
def demo_command(ctx: click.Context) -> None:
    """Build tiny models, merge them with output_qp, ties, dare_ties and task_arithmetic through
    mergekit-yaml, and print held-out loss per domain (options: see `mergekit-qp demo --help`)."""
    from .demo import main as demo_main

    raise SystemExit(demo_main(list(ctx.args)))
