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


@main.command("diagnose")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("merged_path", type=click.Path(exists=True, file_okay=False))
@click.option("--calibration-config", type=click.Path(exists=True, dir_okay=False),
              help="output_qp config of the same experts to take calibration data and settings from")
@click.option("--device", default="cpu", show_default=True, help="device for calibration forward passes")
@click.option("--write/--no-write", default=True, show_default=True,
              help="write merge_report.json/.md into MERGED_PATH")
def diagnose_command(config_file: str, merged_path: str, calibration_config, device: str, write: bool) -> None:
    """Residual energy captured (ρ) by the merged model in MERGED_PATH, made from CONFIG_FILE by
    any method (ties, dare_ties, task_arithmetic, output_qp, ...), on the experts' calibration data."""
    from . import register
    from .plugin import diagnose
    from .report import render_markdown, write_report

    register()
    result = diagnose(config_file, merged_path, calibration_config, device)
    if write:
        write_report(merged_path, result)
    click.echo(render_markdown(result))
