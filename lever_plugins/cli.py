"""``lever-plugins``: run, validate and list plugin recipes.

``--help``, ``validate`` and ``list`` import neither torch nor LAVIS; ``run`` imports them only after
the recipe has been validated.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import click

from lever_plugins import __version__, catalog
from lever_plugins.schema import RecipeError, describe

EXIT_BAD_INPUT = 2


def _fail(exc: Exception, debug: bool) -> None:
    if debug:
        raise exc
    problems = getattr(exc, "problems", None) or [str(exc)]
    source = getattr(exc, "source", None)
    for problem in problems:
        click.echo(f"error: {source + ': ' if source else ''}{problem}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lever-plugins")
def main() -> None:
    """Research plugins for LAVIS / BLIP-2, switched on from YAML recipes."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a recipe key (value parsed as YAML); repeatable")
@click.option("--no-check-paths", is_flag=True, help="do not check that data/weight paths exist")
@click.option("--debug", is_flag=True, help="show tracebacks")
def validate(recipe: str, overrides: Sequence[str], no_check_paths: bool, debug: bool) -> None:
    """Check RECIPE against every plugin's schema without building anything."""
    from lever_plugins.recipes import load_recipe

    try:
        resolved = load_recipe(recipe, overrides, check_paths=not no_check_paths)
    except RecipeError as exc:
        _fail(exc, debug)
        return
    click.echo(f"{recipe}: OK (model {resolved.data['model']['arch']}/{resolved.data['model']['model_type']}, "
               f"task {resolved.data['run']['task']}, datasets {', '.join(resolved.data['datasets'])})")


RECIPE_REFERENCE_PATH = os.path.join("docs", "recipes.md")


def recipe_reference_markdown() -> str:
    """``docs/recipes.md``: one table per settings block; the ``run:`` keys every task shares once."""
    from lever_plugins.schemas.run import RunSettings

    def table(title: str, rows) -> list[str]:
        lines = ["", title, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, type_name, default, help_text in rows:
            cells = [f"`{key}`", type_name, f"`{default}`", help_text]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return lines

    shared_run_keys = {row[0] for row in describe(RunSettings)}
    lines = ["# Recipe reference", "",
             "Generated from the settings dataclasses by `lever-plugins list --markdown > docs/recipes.md`; a test",
             "keeps it in sync with the code. Every key is validated: an unknown key, a wrong type or a value out of",
             "range is an error naming its path."]
    lines += table("## `run` (every task)", describe(RunSettings))
    for spec in catalog.PLUGINS:
        cls = spec.settings_class()
        if cls is None:
            continue
        rows = describe(cls)
        title = f"## `{spec.recipe_block}` ({spec.kind} `{spec.name}`)"
        if issubclass(cls, RunSettings):
            rows = [row for row in rows if row[0] not in shared_run_keys]
            title += ": its own keys, besides the shared `run` keys"
            if not rows:
                continue
        lines += table(title, rows)
    return "\n".join(lines).strip() + "\n"


@main.command(name="list")
@click.option("--keys/--no-keys", default=True, help="show the recipe keys each plugin reads")
@click.option("--markdown", is_flag=True, help="print the recipe reference as Markdown (docs/recipes.md)")
def list_plugins(keys: bool, markdown: bool) -> None:
    """List every registered plugin: kind, name, class, purpose and recipe keys.

    Plugin packages (entry-point group lever_plugins.plugins) are listed after ours; one that cannot
    be loaded is named on stderr and the exit code is 1.
    """
    if markdown:
        click.echo(recipe_reference_markdown(), nl=False)
        return
    broken: list[str] = []
    for spec in catalog.all_plugins():
        click.echo(f"{spec.kind:<12} {spec.name:<26} {spec.target}")
        click.echo(f"{'':<12} {spec.purpose}")
        if spec.origin:
            click.echo(f"{'':<12} from plugin package {spec.origin}")
        if spec.model_types:
            click.echo(f"{'':<12} model_type: {' | '.join(spec.model_types)}")
        cls, problem = spec.settings_class_or_problem()
        if problem:
            broken.append(problem)
        if keys and cls is not None:
            click.echo(f"{'':<12} reads {spec.recipe_block}:")
            for key, type_name, default, help_text in describe(cls):
                click.echo(f"{'':<14} {key} ({type_name}, default {default}): {help_text}")
        elif spec.recipe_block:
            click.echo(f"{'':<12} selected by {spec.recipe_block}")
        click.echo("")
    errors = catalog.plugin_load_errors() + broken
    for line in errors:
        click.echo(f"error: {line}", err=True)
    if errors:
        sys.exit(1)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a recipe key (value parsed as YAML); repeatable")
@click.option("--dry-run", is_flag=True, help="print the resolved recipe (the file each key came from as a comment) and what each plugin attaches where; build nothing heavy")
@click.option("--resume", is_flag=True, help="continue from the last checkpoint in run.output_dir")
@click.option("--overwrite", is_flag=True, help="start afresh even if run.output_dir already holds a run (old files are moved aside)")
@click.option("--nproc", type=int, default=1, show_default=True, help="processes on this machine (torch.distributed, gloo on CPU / nccl on GPU)")
@click.option("--nnodes", type=int, default=1, show_default=True, help="machines in the run (each runs this command with its --node-rank)")
@click.option("--node-rank", type=int, default=0, show_default=True, help="this machine's index among --nnodes")
@click.option("--master-addr", default="127.0.0.1", show_default=True, help="address of node 0 (multi-node)")
@click.option("--master-port", type=int, default=29500, show_default=True, help="free TCP port on node 0 (multi-node)")
@click.option("--debug", is_flag=True, help="show tracebacks")
def run(recipe: str, overrides: Sequence[str], dry_run: bool, resume: bool, overwrite: bool, nproc: int, nnodes: int,
        node_rank: int, master_addr: str, master_port: int, debug: bool) -> None:
    """Train and evaluate from RECIPE (LAVIS's Config -> task -> datasets -> model -> runner)."""
    from lever_plugins.recipes import load_recipe

    try:
        resolved = load_recipe(recipe, overrides, check_paths=not dry_run)
    except RecipeError as exc:
        _fail(exc, debug)
        return
    if dry_run:
        from lever_plugins.launch import describe_plan

        click.echo(resolved.to_annotated_yaml())  # merged recipe, each key's source file as a comment
        click.echo(describe_plan(resolved))
        try:  # the plan is printed either way; what `validate` would report still fails the dry run
            load_recipe(recipe, overrides, check_paths=True)
        except RecipeError as exc:
            _fail(exc, debug)
        return
    if resume and overwrite:
        _fail(RecipeError(["--resume and --overwrite contradict each other (--resume continues the run in "
                           "run.output_dir, --overwrite moves it aside and starts afresh); pass one of them"]), debug)
    from lever_plugins.launch import LaunchError, Nodes, launch

    nodes = Nodes(count=nnodes, rank=node_rank, master_addr=master_addr, master_port=master_port)
    problems = ([f"--nproc: expected >= 1, got {nproc}"] if nproc < 1 else []) + nodes.problems()
    if problems:
        _fail(RecipeError(problems), debug)
    try:
        launch(resolved, resume=resume, overwrite=overwrite, nproc=nproc, debug=debug, nodes=nodes)
    except (RecipeError, LaunchError) as exc:
        _fail(exc, debug)


@main.command()
def doctor() -> None:
    """Say what is installed, whether LAVIS imports, and how to fix what does not."""
    from lever_plugins.doctor import report

    ok = report(click.echo)
    sys.exit(0 if ok else 1)


@main.command(name="convert-weights")
@click.argument("src", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
@click.option("--temp", type=float, default=0.07, show_default=True,
              help="transformers -> LAVIS: value of LAVIS's `temp` (transformers' BLIP-2 has no temperature)")
@click.option("--vision-heads", type=int, default=None, help="LAVIS -> transformers: ViT attention heads (default: 16 for EVA ViT-g)")
@click.option("--qformer-heads", type=int, default=None, help="LAVIS -> transformers: Q-Former attention heads (default: 12 for width 768)")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@click.option("--debug", is_flag=True, help="show tracebacks")
def convert_weights(src: str, out: str, temp: float, vision_heads: Optional[int], qformer_heads: Optional[int],
                    force: bool, debug: bool) -> None:
    """Convert BLIP-2 weights between a transformers folder and the LAVIS layout `model.pretrained` reads.

    SRC a folder (config.json + model.safetensors / pytorch_model.bin, e.g. Blip2ForImageTextRetrieval;
    Blip2Model / Blip2ForConditionalGeneration give the vision and Q-Former parts): OUT is a LAVIS
    checkpoint file. SRC a LAVIS checkpoint file: OUT is a Blip2ForImageTextRetrieval folder. Every
    weight is accounted for: what is not used, filled in or absent is listed. (`model.pretrained` may
    also name a transformers folder directly: it is converted in memory the same way.)
    """
    import yaml

    from lever_plugins.models import convert_blip2 as convert

    if os.path.exists(out) and not force:
        _fail(RuntimeError(f"{out}: already exists (pass --force to replace it)"), debug)
    if os.path.isdir(src) and os.path.isdir(out):
        _fail(RuntimeError(f"{out}: is a folder; a transformers folder converts to a LAVIS checkpoint file"), debug)
    try:
        if os.path.isdir(src):
            config, tensors = convert.read_transformers_folder(src)
            state_dict, report = convert.transformers_to_lavis(tensors, config, source=src, temp=temp)
            import torch

            from lever_plugins.io import atomic_output

            with atomic_output(out) as tmp:
                torch.save({"model": state_dict}, tmp)
            settings = convert.recipe_settings_for(config)
            written = out
        else:
            state_dict = convert.read_checkpoint(src)
            hf_state, config, report = convert.lavis_to_transformers(
                state_dict, source=src, vision_heads=vision_heads, qformer_heads=qformer_heads)
            written = convert.save_transformers_folder(hf_state, config, out)
            settings = convert.recipe_settings_for(config)
    except convert.ConversionError as exc:
        _fail(exc, debug)
        return
    click.echo(report.text())
    click.echo(f"wrote {written}")
    if settings:
        block = yaml.safe_dump({"model": settings}, sort_keys=False, default_flow_style=False)
        click.echo("# model sizes matching these weights (recipe keys):\n" + block.rstrip())
        vocab = (config.get("qformer_config") or {}).get("vocab_size")
        if vocab:
            click.echo(f"# model.qformer.vocab_file: a WordPiece vocab.txt of {vocab - 1} tokens "
                       "(BLIP-2 adds [DEC]; bert-base-uncased for the released weights)")


@main.command(name="gate-maps")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--checkpoint", default=None, help="checkpoint file (default: RUN_DIR/checkpoint_best.pth)")
@click.option("--split", default="val", show_default=True)
@click.option("-n", "--num", "num_queries", type=int, default=8, show_default=True, help="queries to draw")
@click.option("--out", "out_dir", default=None, help="output folder (default: RUN_DIR/gate_maps)")
@click.option("--debug", is_flag=True, help="show tracebacks")
def gate_maps(run_dir: str, checkpoint: Optional[str], split: str, num_queries: int, out_dir: Optional[str], debug: bool) -> None:
    """Save per-patch gate heat-maps of a trained gated-fusion run over its reference images."""
    from lever_plugins.launch import LaunchError
    from lever_plugins.tasks.gate_maps import save_gate_maps_for_run

    try:
        paths = save_gate_maps_for_run(run_dir, checkpoint=checkpoint, split=split, num_queries=num_queries, out_dir=out_dir)
    except (RecipeError, LaunchError) as exc:
        _fail(exc, debug)
        return
    shown = max(len(paths) - 1, 0)  # the last file is their grid
    click.echo(f"wrote {shown} gate maps and grid.png to {os.path.dirname(paths[0]) if paths else out_dir}")


if __name__ == "__main__":
    main()
