"""The `mergekit-qp` command: an explicit fallback to the start-up hook, the demo, statistics
artifacts, the diagnostic (with its spectrum) and the comparison of methods."""

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
    from ..plugin import run_mergekit_yaml

    run_mergekit_yaml(ctx.args, prog_name="mergekit-qp yaml")


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


@main.command("statistics")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--calibration", required=True, help="calibration data (file, folder or hub dataset name)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="artifact folder to write (shards + card.json); a killed run resumes there")
@click.option("--base", "base_model", type=click.Path(exists=True, file_okay=False), default=None,
              help="base model whose tokenizer tokenises the data [default: MODEL]")
@click.option("--samples", default=128, show_default=True, help="calibration_samples: sequences")
@click.option("--seq-len", default=512, show_default=True, help="calibration_seq_len: tokens per sequence at most")
@click.option("--seed", default=0, show_default=True, help="calibration_seed")
@click.option("--packing/--no-packing", default=False, show_default=True, help="calibration_packing")
@click.option("--field", default=None, help="calibration_field [default: text, else input_ids]")
@click.option("--statistics-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="device of the forward passes")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, show_default=True)
def statistics_command(model: str, calibration: str, out_dir: str, base_model, samples: int, seq_len: int, seed: int,
                       packing: bool, field, statistics_dtype: str, device: str, trust_remote_code: bool) -> None:
    """Compute MODEL's output_qp statistics on its calibration data into an artifact folder that any
    merge can use instead of the data (`statistics: DIR` under that model in the YAML). The card
    (card.json) holds content hashes of the weights and tokenizer, a fingerprint of the data, the
    counts, settings and versions, never the text. Settings must be those of the merge's
    calibration_* parameters for a merge from data to give the same statistics."""
    from .. import statistics
    from ..calibration.artifact import ArtifactError

    try:
        card = statistics(model, calibration, out_dir, base=base_model, samples=samples, seq_len=seq_len, seed=seed,
                          packing=packing, field=field, statistics_dtype=statistics_dtype, device=device,
                          trust_remote_code=trust_remote_code)
    except (ArtifactError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    size = sum(card["statistics"]["files"].values())
    click.echo(f"{out_dir}: statistics of {model} on {card['counts']['sequences']} sequences, "
               f"{card['counts']['tokens']} tokens; {len(card['statistics']['files'])} shards, {size / 2**20:.1f} MiB")


@main.command("diagnose")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("merged_path", type=click.Path(exists=True, file_okay=False))
@click.option("--calibration-config", type=click.Path(exists=True, dir_okay=False),
              help="output_qp config of the same experts to take calibration data and settings from")
@click.option("--device", default="cpu", show_default=True, help="device for calibration forward passes")
@click.option("--write/--no-write", default=True, show_default=True,
              help="write merge_report.json/.md into MERGED_PATH")
@click.option("--spectrum", is_flag=True,
              help="also the spectrum: ρ of the best rank-N update for N = 1, 2, 4, … full, per layer "
                   "(spectrum.json/.md/.png next to the report)")
def diagnose_command(config_file: str, merged_path: str, calibration_config, device: str, write: bool,
                     spectrum: bool) -> None:
    """Residual energy captured (ρ) by the merged model in MERGED_PATH, made from CONFIG_FILE by
    any method (ties, dare_ties, task_arithmetic, output_qp, ...), on the experts' calibration data."""
    from .. import register
    from ..reports import spectrum_report as spectrum_module
    from ..plugin import calibration_problem, diagnose
    from ..plugin import spectrum as experts_spectrum
    from ..reports.merge_report import render_markdown, write_report

    register()
    problem = calibration_problem(config_file, calibration_config, device)
    result = diagnose(config_file, merged_path, problem=problem)
    if write:
        write_report(merged_path, result)
    click.echo(render_markdown(result))
    if spectrum:
        found = experts_spectrum(problem)
        if write:
            spectrum_module.write_spectrum(merged_path, found)
        click.echo(spectrum_module.render_markdown(found, image="spectrum.png" if write else None))


@main.command("compare")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--methods", default="output_qp,ties,dare_ties,task_arithmetic", show_default=True,
              help="comma-separated merge methods (any registered mergekit method, e.g. ties_svc, linear)")
@click.option("-p", "--param", "params", multiple=True, metavar="METHOD:NAME=VALUE",
              help="set a parameter of one method (repeatable), e.g. -p ties:density=0.3 "
                   "-p output_qp:basis=rank-8; VALUE is read as YAML")
@click.option("--eval", "eval_files", multiple=True, metavar="FILE | EXPERT=FILE",
              help="held-out data, repeatable: one FILE per expert in config order, or EXPERT=FILE "
                   "(EXPERT: the model as in the config, or its folder name); any format calibration accepts")
@click.option("--eval-samples", default=256, show_default=True, help="held-out sequences per task (at most)")
@click.option("--eval-seq-len", type=int, default=None,
              help="held-out tokens per sequence [default: calibration_seq_len, capped by the model's context]")
@click.option("--out", "out_dir", default="compare-out", show_default=True, type=click.Path(file_okay=False),
              help="folder for compare.json/.md/.png, spectrum.*, the derived configs, logs (and models)")
@click.option("--device", default="cpu", show_default=True,
              help="device of the merges (mergekit-yaml --device), calibration passes and held-out loss")
@click.option("--keep-models/--no-keep-models", default=False, show_default=True,
              help="keep the merged models in OUT/models/METHOD (by default each is deleted once measured)")
@click.option("--spectrum/--no-spectrum", "with_spectrum", default=True, show_default=True,
              help="also the rank spectrum of the experts (one SVD per linear map; slow on large models)")
def compare_command(config_file: str, methods: str, params, eval_files, eval_samples: int, eval_seq_len,
                    out_dir: str, device: str, keep_models: bool, with_spectrum: bool) -> None:
    """Merge the experts of CONFIG_FILE (an output_qp config: base_model, models with
    calibration) with each method through `mergekit-yaml`, and print one table: ρ overall and
    per task, held-out loss per task (with --eval), wall time, × ties (or the first built-in
    method), and peak RSS of each merge, plus the base and each expert for reference.

    \b
    Derived configs keep the base, models, dtype and tokenizer settings. Built-in methods get
    these per-expert defaults (K experts), before any -p:
      ties, dare_ties, della          weight 1.0, density 0.5
      task_arithmetic                 weight 1/K (the average task vector)
      dare_linear, della_linear       weight 1/K, density 0.5
      breadcrumbs(_ties)              weight 1/K (1.0 for _ties), density 0.9, gamma 0.01
      linear                          weight 1.0 (no base model)
      <method>_svc                    as <method>; other methods: weight 1.0 if required
    output_qp uses CONFIG_FILE's own parameters. A -p name that the method does not have is
    an error before anything runs. ρ of every model is measured on CONFIG_FILE's calibration
    statistics (computed once, cached) and task weights; the spectrum (ρ against rank) of the
    experts goes to spectrum.json/.md/.png with output_qp's ridge. Held-out loss needs causal LMs.
    """
    from .compare import CompareError, compare
    from .compare_report import format_table

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        result = compare(config_file, chosen, params, eval_files, out_dir, device, keep_models,
                         eval_samples, eval_seq_len, with_spectrum)
    except CompareError as error:
        raise click.ClickException(str(error)) from None
    click.echo(format_table(result))
    written = "compare.json, compare.md, compare.png" + (", spectrum.json, spectrum.md, spectrum.png" if with_spectrum else "")
    click.echo(f"\nwritten: {out_dir}/{written}")


@main.command("plan")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--methods", default="output_qp,linear,task_arithmetic,ties", show_default=True,
              help="comma-separated merge methods to predict (any registered mergekit method)")
@click.option("--bases", default="full,diagonal,task", show_default=True,
              help="output_qp bases, one row each (unless -p output_qp:basis=… picks one)")
@click.option("-p", "--param", "params", multiple=True, metavar="METHOD:NAME=VALUE",
              help="set a parameter of one method (repeatable), as for compare")
@click.option("--out", "out_dir", default="plan-out", show_default=True, type=click.Path(file_okay=False),
              help="folder for plan.json/.md/.png")
@click.option("--device", default="cpu", show_default=True, help="device of the calibration passes")
@click.option("--eval", "eval_files", multiple=True, metavar="FILE",
              help="held-out data, one FILE per expert in config order: needed when an expert lists several "
                   "checkpoints (each checkpoint's gain is its held-out loss drop against the base)")
@click.option("--eval-samples", default=256, show_default=True, help="held-out sequences per task (at most)")
@click.option("--eval-seq-len", type=int, default=None,
              help="held-out tokens per sequence [default: calibration_seq_len, capped by the model's context]")
@click.option("--select-by", default="output_qp full", show_default=True,
              help="the planned row whose per-task ρ scores the combinations of checkpoints")
def plan_command(config_file: str, methods: str, bases: str, params, out_dir: str, device: str, eval_files,
                 eval_samples: int, eval_seq_len, select_by: str) -> None:
    """Before merging: the ρ (overall and per task) each method would reach on the experts of
    CONFIG_FILE (an output_qp config), the experts' output energies, how strongly each moves
    every task's outputs (interference matrix, heat map in plan.png), the cosines of their
    output changes, and warnings, from the calibration statistics alone: no model is written.
    Methods get the same per-expert defaults as compare; the predicted ρ is the ρ `diagnose`
    measures on the merge. output_qp with sequential: true is not predicted.

    \b
    An expert may list several checkpoints (`model: [run/ckpt-100, run/ckpt-200]`, or a folder
    of checkpoint folders): with --eval, every combination (or, past 16, a coordinate ascent)
    is scored by Σ_k max(gain_k, 0) · ρ_k, the best planned in full and written to
    OUT/plan-configs/selected.yml.
    """
    from .compare import CompareError, read_config
    from .plan import plan
    from .plan_report import format_table
    from .plan_select import candidates_of, select_checkpoints

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    chosen_bases = [b.strip() for b in bases.split(",") if b.strip()]
    try:
        if candidates_of(read_config(config_file, command="plan")):
            result = select_checkpoints(config_file, eval_files, chosen, params, chosen_bases, out_dir, device,
                                        select_by, eval_samples, eval_seq_len)
            click.echo(f"chosen checkpoints: {', '.join(result['selection']['chosen']['checkpoints'].values())} "
                       f"(score {result['selection']['chosen']['score']:.4f}; last checkpoints "
                       f"{result['selection']['last']['score']:.4f})")
        else:
            if eval_files:
                raise CompareError("plan: --eval is for experts that list several checkpoints; this config lists one each")
            result = plan(config_file, chosen, params, chosen_bases, out_dir, device)
    except (CompareError, ValueError, OSError) as error:  # the data's and the models' own errors too
        raise click.ClickException(str(error)) from None
    click.echo(format_table(result))
    for line in result["warnings"]:
        click.echo(f"warning: {line}")
    click.echo(f"\nwritten: {out_dir}/plan.json, plan.md, plan.png")
