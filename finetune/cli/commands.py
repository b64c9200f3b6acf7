"""The ``finetune`` command: a thin shell over the Python API.

Each command parses its options, makes one library call and prints the result; the group turns
every :class:`~finetune.errors.FinetuneError` into a one-line message and exit status 1.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from finetune import __version__
from finetune.cli.options import fit_option, fit_options
from finetune.config import CHECKPOINTS, DEFAULT_MAX_IMAGES, LOG_FORMATS, TTA_CHOICES, FitConfig
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from finetune.inference.evaluate import Evaluation
    from finetune.inference.inputs import Skipped
    from finetune.inference.predict import BasePredictor, Prediction
    from finetune.pipeline import FitResult, Plan
    from finetune.tuning import TuneResult

# The commands import the API inside their bodies: `finetune --help` stays instant instead of
# waiting seconds for torch, timm and scikit-learn to load.

__all__ = ["cli", "main"]


class _Group(click.Group):
    """The one place where library errors become clean CLI messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FinetuneError as exc:
            raise click.ClickException(str(exc)) from exc


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="finetune")
def cli() -> None:
    """Turn a folder of labelled images into an image classifier by transfer learning."""
    warnings.showwarning = _show_warning


def _decorate_with(options_of):
    """Apply the click options ``options_of()`` returns, in order."""

    def decorate(command):
        for option in reversed(options_of()):
            command = option(command)
        return command

    return decorate


_recipe_option = click.option(
    "--recipe",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A TOML file of FitConfig fields (recipes/ has examples) used as the base; options "
    "typed here override it. The run's config.json records every value used.",
)


def _config_from(options: dict[str, object], recipe: Path | None) -> FitConfig:
    """The FitConfig the command line asks for: the recipe (if any) as the base, then only the
    options the user typed: defaults never override a recipe."""
    if recipe is None:
        return FitConfig.from_kwargs(**options)
    from finetune.recipes import load_recipe

    typed = {name: value for name, value in options.items() if _typed(options, name)}
    return FitConfig.from_kwargs(load_recipe(recipe), **typed)


def _typed(options: dict[str, object], name: str) -> bool:
    """Whether the user typed option ``name`` on the command line."""
    ctx = click.get_current_context()
    return name in options and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE


def _recipe_words(recipe: Path | None) -> list[str]:
    return ["--recipe", str(recipe)] if recipe is not None else []


def _inference_option_list() -> list:
    """The options shared by `predict` and `evaluate`."""
    return [
        click.option(
            "--checkpoint",
            type=click.Choice(CHECKPOINTS),
            default="best",
            show_default=True,
            help="Which weights of a run directory: best.pt, last.pt, ema.pt (fit --ema) or "
            "every snapshot-K.pt (fit --schedule restarts) with their softmax averaged.",
        ),
        click.option(
            "--ensemble",
            is_flag=True,
            help="Average the softmax of several models (run directories, checkpoints, "
            "exports; same classes, any architecture or image size): predict takes the "
            "leading arguments that are models, evaluate all but the last.",
        ),
        click.option(
            "--tta",
            type=click.Choice(TTA_CHOICES),
            default="auto",
            show_default=True,
            help="Test-time augmentation: average the softmax over the mirror image (flip) or 4 "
            "corner + centre crops and their mirrors (10crop); auto: the mode fit found best on "
            "the run's val images (none for models without that record). A mode that scored "
            "below it there gets a warning.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help="Images per forward pass (lower it if memory runs out).",
        ),
        click.option("--device", help="cpu, cuda or cuda:N [default: cuda when available]."),
    ]


_inference_options = _decorate_with(_inference_option_list)


@cli.command("fit")
@click.argument("data", type=click.Path(path_type=Path), required=False)
@_recipe_option
@fit_options()
@click.option(
    "--resume",
    type=click.Path(path_type=Path),
    help="Continue the stopped run in this directory from its last.pt (DATA and the other "
    "options come from the run).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the final summary.")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="json: instead of the lines for people and the progress bars, one JSON object per "
    "line on stderr (events data, decision, epoch, message, warning, summary).",
)
def fit_command(
    data: Path | None,
    quiet: bool,
    log_format: str,
    resume: Path | None,
    recipe: Path | None,
    **options,
) -> None:
    """Train a classifier on DATA, a folder with one sub-folder of images per class.

    If DATA holds train/ and val/ folders they are used as they are; otherwise a seeded,
    stratified split holds out --val-split of each class.

    With --strategy auto (the default) it first measures how much data there is and how
    similar it is to ImageNet, picks one of the four strategies and says why
    (`finetune plan DATA` shows that decision without training).

    A stopped run (Ctrl-C, killed, crashed) continues with `finetune fit --resume RUN_DIR`.

    At the end it writes RUN_DIR/report.html (data, decision, curves, evaluation on the
    validation images) and prints a summary with the next commands.

    --recipe FILE starts from a recipe (a TOML file of FitConfig fields, e.g. the best.toml that
    `finetune tune` writes); options typed on the command line override its values.

    Example:

        finetune fit sample_data/fashion

        finetune fit sample_data/fashion --recipe recipes/fast-cpu.toml
    """
    if resume is not None:
        given = _given_options(options)
        if data is not None or recipe is not None or given:
            raise click.UsageError(
                "--resume continues a run with its own data and options; give only the run "
                "directory: finetune fit --resume RUN_DIR"
            )
        from finetune.pipeline import resume as resume_run

        _json_warnings(log_format, quiet)
        result = resume_run(resume, verbose=not quiet, log_format=log_format)
        click.echo(_summary(result))
        return
    if data is None:
        raise click.UsageError("Give DATA, the image folder (or --resume RUN_DIR).")
    config = _config_from(options, recipe)  # before torch loads
    from finetune.pipeline import fit

    if recipe is not None and not quiet and log_format == "text":
        typed = shlex.join(_given_options({k: v for k, v in options.items() if k != "out"}))
        click.echo(f"recipe    {recipe}" + (f", overridden by {typed}" if typed else ""), err=True)
    _json_warnings(log_format, quiet)
    result = fit(data, config, verbose=not quiet, log_format=log_format)
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks for all the processes
        click.echo(_summary(result))


def _json_warnings(log_format: str, quiet: bool) -> None:
    """With --log-format json, warnings too are JSON lines: stderr stays parseable."""
    if log_format != "json" or quiet:
        return

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        click.echo(json.dumps({"event": "warning", "message": str(message)}), err=True)

    warnings.showwarning = show


def _summary(result: FitResult) -> str:
    best = result.best
    why = f"auto: {result.decision.cell}" if result.decision else "chosen with --strategy"
    run = str(result.dir)
    exports = [str(p) for p in result.run.exports()]
    data = _data_of(result.dir)
    test = data / "test" if data is not None else None
    folder = str(test) if test is not None and test.is_dir() else "LABELLED_FOLDER"
    lines = [
        "",
        f"  run          {result.dir}",
        f"  strategy     {result.strategy} ({why})",
        f"  classes      {len(result.classes)}: {', '.join(result.classes)}",
        f"  best epoch   {best.epoch}/{len(result.history)}: val acc {best.val_acc:.3f}, "
        f"val loss {best.val_loss:.3f} (train acc {best.train_acc:.3f})"
        + (
            (
                f"; stopped early (patience {result.config.patience})"
                if result.config.patience
                else "; ended by the time budget"
            )
            if len(result.history) < result.config.epochs
            else ""
        ),
        *(
            [f"  kept         {result.comparison.describe()}"]
            if result.comparison is not None
            else []
        ),
        *(
            [
                f"  ema          best val acc {result.best_ema.ema_val_acc:.3f} "
                f"(epoch {result.best_ema.epoch}) in {result.run.ema}"
            ]
            if result.best_ema is not None
            else []
        ),
        *(
            [f"  snapshots    {len(result.snapshots)}: predict with --checkpoint snapshots"]
            if result.snapshots
            else []
        ),
        *([f"  tta          {result.tta.describe()}"] if result.tta is not None else []),
        f"  time         {result.seconds:.1f}s",
        f"  checkpoints  {result.best_checkpoint} (best), {result.last_checkpoint} (last)",
        f"  exports      {', '.join(exports) or 'none yet (finetune export, below)'}",
        f"  report       {result.report or 'not written (see the warning above)'}",
    ]
    if result.skipped:
        lines.append(f"  skipped      {len(result.skipped)} files, listed in {result.run.scan}")
    lines += [
        "",
        "Next:",
        f"  {shlex.join(['finetune', 'predict', run])} IMAGES_OR_FOLDERS...",
        f"  {shlex.join(['finetune', 'evaluate', run, folder])}",
        f"  {shlex.join(['finetune', 'export', run])}",
        f"  {shlex.join(['finetune', 'report', run])}  (again after evaluate: adds its results)",
    ]
    return "\n".join(lines)


def _data_of(run_dir: Path) -> Path | None:
    """The data folder a run recorded in scan.json, if it still exists."""
    try:
        from finetune.run.layout import RunDir

        root = Path(json.loads(RunDir(run_dir).scan.read_text())["root"])
    except (OSError, ValueError, KeyError):
        return None
    return root if root.is_dir() else None


@cli.command("plan")
@click.argument("data", type=click.Path(path_type=Path))
@_recipe_option
@fit_options(exclude=("out",))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(data: Path, as_json: bool, recipe: Path | None, **options) -> None:
    """Show what `fit DATA` would do, without training: the measurements, the strategy chosen
    and why, and how long training should take on this machine.

    Takes the same options as `fit`, --recipe included.

    Example:

        finetune plan sample_data/fashion
    """
    config = _config_from(options, recipe)  # a bad recipe fails before torch loads
    from finetune.pipeline import plan

    result = plan(data, config)
    rerun = shlex.join(
        ["finetune", "fit", str(data), *_recipe_words(recipe), *_given_options(options)]
    )
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else _plan_text(result, rerun))


def _given_options(options: dict[str, object]) -> list[str]:
    """The options the user typed, as command-line words (to print the matching fit command)."""
    ctx = click.get_current_context()
    words: list[str] = []
    for param in ctx.command.params:
        if param.name not in options:
            continue
        if ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        value = options[param.name]
        if getattr(param, "is_flag", False):
            words.append(
                param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0]
            )
        elif isinstance(value, tuple):
            words += [param.opts[0], *(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            words += [param.opts[0], str(value)]
    return words


def _plan_text(plan: Plan, rerun: str) -> str:
    from finetune.data.transforms import augmentation_of
    from finetune.reporting.runs import duration

    split, config, decision = plan.data, plan.config, plan.decision
    lines = [
        f"data       {split.root}: {len(split.classes)} classes, {len(split.train)} train / "
        f"{len(split.val)} val images ({split.layout})",
    ]
    if decision is not None:
        size = decision.size
        shift = decision.batchnorm_shift
        lines += [
            f"size       median {size.per_class_median:g} training images per class "
            f"(min {size.per_class_min}, max {size.per_class_max})",
            "similarity "
            + ("unknown" if shift is None else f"BatchNorm shift {shift:.3f}")
            + f" (similar below {decision.thresholds['similar_below_batchnorm_shift']})",
            f"cell       {decision.cell}",
            "why",
            *(f"  - {reason}" for reason in decision.reasons),
        ]
    if plan.trains_backbone:
        how = (
            f"{config.epochs} epochs at {config.image_size} px, batch {config.batch_size}, "
            f"{config.optimizer} head lr {config.lr:g} on {config.device}"
        )
    else:
        how = (
            f"one feature pass at {config.image_size} px on {config.device}, then "
            "logistic regression (regularisation by cross-validation)"
        )
    lines += [
        f"strategy   {plan.strategy}: {how}",
        *(
            [f"settings   {_settings(decision.hyperparameters)}"]
            if decision is not None and plan.trains_backbone
            else []
        ),
        *([f"augment    {augmentation_of(config).describe()}"] if plan.trains_backbone else []),
        f"estimate   about {duration(plan.estimate_seconds, 0)} of training on this machine",
        "",
        "Run it:",
        f"  {rerun}",
    ]
    return "\n".join(lines)


def _settings(values: dict[str, object]) -> str:
    values = {k: v for k, v in values.items() if k != "augment"}  # a line of its own
    return ", ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
    )


@cli.command("tune")
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Training runs: about 2/3 coarse (a third of the epochs, wide ranges), the rest fine "
    "(full epochs, around the best coarse trial).",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0, min_open=True),
    help="Minutes: launch no trial expected to end later (estimated from the trials so far; "
    "the first always runs) [default: no limit].",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Tune directory: trials.csv, tune.png, best.toml, trial-NN/ "
    "[default: runs/<data>-tune-<time>].",
)
@_recipe_option
@fit_options(exclude=("out",))  # --out above is the tune directory
@click.option("-q", "--quiet", is_flag=True, help="Print only the final table.")
def tune_command(
    data: Path,
    trials: int,
    budget: float | None,
    out: Path | None,
    recipe: Path | None,
    quiet: bool,
    **options,
) -> None:
    """Search the learning rate and weight decay of a fine-tune on DATA by random search on log
    scales: a coarse stage over lr /10..x10 around --lr (default: the optimizer's) and weight
    decay 1e-5..1e-1 with a third of the epochs, then a fine stage /3..x3 around the best
    coarse trial with all of them. Each trial is a real fit; --seed seeds the search and the
    trials, so a tune is reproducible.

    Takes fit's options and --recipe as the base of every trial (--strategy auto is decided
    once, before the first trial; the probes have no LR to tune). Writes trials.csv, tune.png
    and best.toml, a recipe for `finetune fit DATA --recipe best.toml`.

    Example:

        finetune tune sample_data/fashion --strategy finetune-top --trials 8
    """
    if _typed(options, "weight_decay"):
        raise click.UsageError(
            "tune searches the weight decay (1e-5..1e-1); leave out --weight-decay."
        )
    config = _config_from(options, recipe)  # a bad recipe fails before torch loads
    from finetune.tuning import tune

    result = tune(
        data,
        config,
        trials=trials,
        budget_minutes=budget,
        out=out,
        seed=config.seed,
        verbose=not quiet,
    )
    click.echo(_tune_text(result))


def _tune_text(result: TuneResult) -> str:
    from finetune.reporting.runs import duration

    best = result.best
    lines = [
        "",
        result.table(),
        "",
        (
            f"  best         trial 0, the {result.best_strategy} probe: val acc "
            f"{best.val_acc:.3f}, better than every full-length fine-tune trial"
            if best.stage == "probe"
            else f"  best         trial {best.trial} ({best.stage}): lr {best.lr:.3g}, weight "
            f"decay {best.weight_decay:.3g}, val acc {best.val_acc:.3f}"
        ),
        f"  strategy     {result.strategy}"
        + (f" and the {result.probe.strategy} probe" if result.probe else "")
        + f", {sum(t.stage != 'probe' for t in result.trials)} of {result.requested} trials in "
        f"{duration(result.seconds, 0)}" + (" (and the probe)" if result.probe else ""),
        *([f"  budget       {result.stopped}"] if result.stopped else []),
        f"  trials       {result.trials_csv}",
        f"  plot         {result.plot}",
        f"  recipe       {result.recipe}",
        "",
        "Next:",
        f"  {shlex.join(['finetune', 'fit', str(result.data), '--recipe', str(result.recipe)])}",
    ]
    return "\n".join(lines)


@cli.command("evaluate")
@click.argument(
    "models", nargs=-1, required=True, metavar="MODEL...", type=click.Path(path_type=Path)
)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Also report top-K accuracy: the true class among the K most probable.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="Where the report and plots go [default: the first MODEL's folder/eval-FOLDER, plus "
    "-CHECKPOINT unless best, plus -ensemble with --ensemble].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@_inference_options
def evaluate_command(
    models: tuple[Path, ...],
    folder: Path,
    top_k: int,
    out: Path | None,
    as_json: bool,
    checkpoint: str,
    ensemble: bool,
    tta: str,
    batch_size: int,
    device: str | None,
) -> None:
    """Measure MODEL (run directory, checkpoint or bundle) on FOLDER, a labelled folder with one
    sub-folder per class: accuracy, top-k, per-class precision/recall/F1, a confusion matrix
    and the most confidently wrong images (evaluation.json, confusion.png, mistakes.png).

    With --ensemble, every argument but the last is a model and their softmax is averaged;
    evaluation.json lists them.

    Examples:

    \b
        finetune evaluate runs/fashion-stage-probe-20261123-092021 sample_data/fashion/test
        finetune evaluate runs/fashion-finetune-all-20261124-101500 sample_data/fashion/test \\
            --checkpoint ema
        finetune evaluate --ensemble runs/lite0 runs/lite2 sample_data/fashion/test
    """
    if len(models) > 1 and not ensemble:
        raise click.UsageError(
            f"Got {len(models)} models ({', '.join(map(str, models))}) for one FOLDER; add "
            "--ensemble to average them, or give one: finetune evaluate MODEL FOLDER"
        )
    predictor = _load_models(models, ensemble, checkpoint, device)
    note = _SkipPrinter()
    result = predictor.evaluate(folder, top_k=top_k, batch_size=batch_size, tta=tta, on_skip=note)
    home = models[0] if models[0].is_dir() else models[0].parent
    suffix = ("" if checkpoint == "best" else f"-{checkpoint}") + ("-ensemble" if ensemble else "")
    from finetune.run.layout import RunDir

    files = result.save(out or RunDir(home).evaluation(f"{folder.resolve().name}{suffix}"))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(_evaluation_text(result, files))
    _exit_if_skipped(result.skipped)


def _load_models(
    models: Sequence[Path], ensemble: bool, checkpoint: str, device: str | None
) -> BasePredictor:
    """One model, or with --ensemble all of them averaged."""
    from finetune.inference.predict import load, load_ensemble

    if ensemble:
        return load_ensemble(models, device=device, checkpoint=checkpoint)
    return load(models[0], device=device, checkpoint=checkpoint)


def _evaluation_text(result: Evaluation, files: dict[str, Path]) -> str:
    correct = int((result.predicted == result.labels).sum())
    width = max(len(c) for c in result.classes) + 2
    lines = [
        f"accuracy     {result.accuracy:.3f} ({correct}/{len(result.labels)})"
        + (f"  with tta {result.tta}" if result.tta != "none" else ""),
        f"top-{result.top_k}        {result.top_k_accuracy:.3f}",
        *_model_lines(result.model or {}),
        "",
        f"{'class':<{width}}precision  recall      f1  support",
    ]
    for name, m in result.per_class().items():
        lines.append(
            f"{name:<{width}}{m['precision']:>9.3f}{m['recall']:>8.3f}{m['f1']:>8.3f}"
            f"{m['support']:>9d}"
        )
    lines += ["", "most confidently wrong:"]
    lines += [
        f"  {m.path}  {m.true} -> {m.predicted} ({m.probability:.2f})" for m in result.mistakes(5)
    ] or ["  none"]
    lines += [
        "",
        f"report       {files['json']}",
        f"confusion    {files['confusion']}",
        f"mistakes     {files['mistakes']}",
    ]
    return "\n".join(lines)


def _model_lines(model: dict) -> list[str]:
    """Which weights were measured, when that is not simply a run's best.pt."""
    if "ensemble" in model:
        files = _files(model)
        checkpoint = f", checkpoint {model['checkpoint']}" if model["checkpoint"] else ""
        return [f"ensemble     {len(files)} models{checkpoint}: {', '.join(files)}"]
    if model.get("checkpoint") not in (None, "best"):
        return [f"checkpoint   {model['checkpoint']}: {model['file']}"]
    return []


def _files(model: dict) -> list[str]:
    if "ensemble" in model:
        return [f for member in model["ensemble"] for f in _files(member)]
    return [str(model["file"])]


@cli.command("export")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "torchscript", "onnx"]),
    default="safetensors",
    show_default=True,
    help="safetensors: a bundle directory (model.safetensors + model.json); torchscript: one "
    "traced file for torch.jit.load; onnx: opset 18, dynamic batch (needs finetune[onnx]).",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="Output path, used as given: no suffix is added or needed (predict and load tell the "
    "format from the content) [default: RUN/bundle, RUN/model.torchscript.pt or RUN/model.onnx].",
)
@click.option(
    "--force",
    is_flag=True,
    help="Write where -o holds something else: the bundle's model.json and model.safetensors "
    "into a folder with other files (which are kept), or a file over one that is not an export "
    "of this kind. Never removes a file export did not write.",
)
def export_command(model: Path, fmt: str, out: Path | None, force: bool) -> None:
    """Export MODEL (a run directory or checkpoint) for deployment.

    Exports carry the class names and preprocessing: `finetune predict EXPORT ...` and
    `finetune.load(EXPORT)` give the same answers as on the run directory, whatever name
    -o gives the export. The bundle loads with no pickle at all.

    An earlier export at -o is replaced; anything else there (a folder holding other files, a
    file that is not an export) is left alone and the export refuses, unless --force.

    Example:

        finetune export runs/fashion-stage-probe-20261123-092021
    """
    from finetune.inference.export import export

    click.echo(str(export(model, fmt, out, force=force)))


@cli.command("predict")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many classes to show per image.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="table: tab-separated lines; json: a list of objects; csv: a header, then one row per "
    "image. All stream: each batch prints as it completes.",
)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@_inference_options
def predict_command(
    model: Path,
    inputs: tuple[Path, ...],
    top_k: int,
    fmt: str,
    as_json: bool,
    checkpoint: str,
    ensemble: bool,
    tta: str,
    batch_size: int,
    device: str | None,
) -> None:
    """Classify images with MODEL: a run directory, a checkpoint, or an export (bundle
    directory, TorchScript .pt or .onnx).

    INPUTS are image files or folders (read recursively); `-` reads paths from standard input,
    one per line.

    With --ensemble, the leading arguments that are models (run directories, .pt, .onnx,
    bundles) are averaged and the rest are INPUTS.

    Examples:

    \b
        finetune predict runs/fashion-linear-20261122-120000 sample_data/fashion/test
        finetune predict --ensemble runs/lite0 runs/lite2/model.onnx sample_data/fashion/test
        finetune predict runs/fashion-restarts sample_data/fashion/test --checkpoint snapshots
    """
    from finetune.inference.predict import expand_inputs, leading_models

    models = [model]
    if ensemble:
        models, inputs = leading_models((model, *inputs))
        if not models:
            raise click.UsageError(
                f"--ensemble: {model} is not a model (a run directory, .pt, .onnx or bundle); "
                "give the models first: finetune predict --ensemble RUN1 RUN2 IMAGES..."
            )
        if not inputs:
            raise click.UsageError(
                "--ensemble: give images or folders after the models: finetune predict "
                "--ensemble RUN1 RUN2 IMAGES..."
            )
    items = [i for item in inputs for i in (_stdin_paths() if str(item) == "-" else [item])]
    paths = expand_inputs(items)
    if not paths:
        raise click.ClickException("No image files found in " + ", ".join(map(str, inputs)))
    predictor = _load_models(models, ensemble, checkpoint, device)
    note = _SkipPrinter()
    predictions = predictor.iter_predict(
        paths, top_k=top_k, batch_size=batch_size, tta=tta, on_skip=note
    )
    fmt = "json" if as_json else fmt
    if fmt == "json":
        _echo_json_list(p.to_dict() for p in predictions)
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        ranks = [f"{name}_{i}" for i in range(2, top_k + 1) for name in ("label", "probability")]
        writer.writerow(["path", "label", "probability", *ranks])
        for p in predictions:
            extra = [v for label, prob in p.top_k[1:] for v in (label, f"{prob:.6f}")]
            extra += [""] * (len(ranks) - len(extra))  # fewer classes than --top-k
            writer.writerow([p.path, p.label, f"{p.probability:.6f}", *extra])
            sys.stdout.flush()
    else:
        for p in predictions:
            click.echo(_prediction_line(p, top_k))
    _exit_if_skipped(note.skipped)


def _stdin_paths() -> list[Path]:
    return [Path(line.strip()) for line in sys.stdin if line.strip()]


def _echo_json_list(items) -> None:
    """Print a JSON list one object per line, each as soon as it is known (the comma after an
    object waits for the next one)."""
    click.echo("[")
    held = None
    for item in items:
        if held is not None:
            click.echo(held + ",")
        held = "  " + json.dumps(item)
    if held is not None:
        click.echo(held)
    click.echo("]")


def _prediction_line(p: Prediction, top_k: int) -> str:
    """One line per image, whatever its file or class names hold (--format json and csv keep
    them exact)."""
    path = _printable(p.path)
    if top_k == 1:
        return f"{path}\t{_printable(p.label)}\t{p.probability:.3f}"
    ranked = ", ".join(f"{_printable(label)} {prob:.3f}" for label, prob in p.top_k)
    return f"{path}\t{ranked}"


def _printable(text: object) -> str:
    """``text`` on one line, unambiguous: a name holding a tab, a newline or another
    character that does not print (``str.isprintable``) is shown as its Python repr, quoted
    and escaped (``'a\\tb.png'``); any other name as it is."""
    text = str(text)
    return text if text.isprintable() else repr(text)


# The exit status of predict, evaluate, check and augment-preview when they finished but left
# out image files that could not be read (each named on stderr with the reason).
SKIPPED_EXIT = 3


class _SkipPrinter:
    """An ``on_skip`` for the commands: prints each image left out on stderr, as it happens,
    and keeps them for :func:`_exit_if_skipped`."""

    def __init__(self) -> None:
        self.skipped: list[Skipped] = []

    def __call__(self, skip: Skipped) -> None:
        self.skipped.append(skip)
        what = _printable(skip.path) if skip.path is not None else f"input {skip.index}"
        click.echo(f"skipped {what}: {skip.reason}", err=True)


def _exit_if_skipped(skipped: Sequence[Skipped]) -> None:
    """Exit with :data:`SKIPPED_EXIT` when images were left out: the output is complete for
    the others, and a script can tell that some are missing."""
    if skipped:
        click.echo(
            f"{len(skipped)} image file{'s' if len(skipped) != 1 else ''} could not be read "
            f"and {'were' if len(skipped) != 1 else 'was'} left out (listed above); exit "
            f"status {SKIPPED_EXIT}.",
            err=True,
        )
        raise click.exceptions.Exit(SKIPPED_EXIT)


@cli.command("augment-preview")
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(),
    default="augment-preview.png",
    show_default=True,
    help="The PNG to write (a folder, or a path ending in /: augment-preview.png in it).",
)
@click.option(
    "--images",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Training images shown (rows).",
)
@click.option(
    "--versions",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Augmented versions of each image (columns beside the original).",
)
@fit_option("model")
@fit_option("image_size", help="Input side [default: as fit would choose].")
@fit_option("seed")
@fit_options(groups=("augmentation",))
def augment_preview_command(data: Path, out: str, images: int, versions: int, **options) -> None:
    """Write a PNG with training images from DATA beside augmented versions of them: what the
    model will see in `finetune fit DATA` with the same augmentation options.

    Example:

        finetune augment-preview sample_data/fashion --augment strong -o preview.png
    """
    from finetune.reporting.preview import augment_preview

    config = FitConfig.from_kwargs(**options)
    target = _file_in(out, "augment-preview.png")
    note = _SkipPrinter()
    written = augment_preview(data, target, config, images=images, versions=versions, on_skip=note)
    click.echo(str(written))
    _exit_if_skipped(note.skipped)


def _file_in(out: str, name: str) -> Path:
    """The file ``-o`` names: ``out``, or ``name`` inside it when it is a folder or ends in a
    slash (then created), so the path printed is the file written."""
    path = Path(out).expanduser()
    if out.endswith(("/", os.sep)) or path.is_dir():
        if path.exists() and not path.is_dir():
            raise click.UsageError(f"-o {out}: {path} is a file, not a folder.")
        return path / name
    return path


@cli.command("lr-find")
@click.argument("data", type=click.Path(path_type=Path))
@fit_options(exclude=("out",))  # -o/--out below is the plot
@click.option(
    "-o",
    "--out",
    type=click.Path(),
    default="lr-find.png",
    show_default=True,
    help="The plot (a folder, or a path ending in /: lr-find.png in it); the numbers are "
    "written beside it with .json, which never replaces a file lr-find did not write.",
)
@click.option(
    "--steps", type=click.IntRange(min=10), default=100, show_default=True, help="Training steps."
)
@click.option(
    "--start-lr", type=float, default=1e-7, show_default=True, help="The head LR of the first step."
)
@click.option(
    "--end-lr",
    type=float,
    default=10.0,
    show_default=True,
    help="The head LR of the last step (the search stops early if the loss diverges).",
)
def lr_find_command(
    data: Path, out: str, steps: int, start_lr: float, end_lr: float, **options
) -> None:
    """Find a learning rate: train a fresh model on DATA for --steps steps while the head LR
    grows exponentially from --start-lr to --end-lr (the backbone groups keep their ratios to
    it), and plot the loss. The suggestion is the LR of the lowest loss divided by 10.

    Takes the same options as `fit` (strategy, optimizer, image size...); nothing is trained
    for keeps.

    Example:

        finetune lr-find sample_data/fashion --strategy finetune-top -o lr-find.png
    """
    from finetune.pipeline import lr_find

    finding = lr_find(
        data, FitConfig.from_kwargs(**options), out=_file_in(out, "lr-find.png"), steps=steps,
        start_lr=start_lr, end_lr=end_lr,
    )  # fmt: skip
    given = _given_options({k: v for k, v in options.items() if k != "lr"})
    rerun = shlex.join(["finetune", "fit", str(data), *given, "--lr", f"{finding.suggestion:.1e}"])
    click.echo(
        "\n".join(
            [
                f"suggested lr  {finding.suggestion:.1e} (the loss was lowest at "
                f"{finding.minimum:.1e}; divided by 10)",
                f"steepest      {finding.steepest:.1e} (where the loss fell fastest)",
                f"steps         {len(finding.lrs)}"
                + (" (stopped: the loss diverged)" if finding.diverged else ""),
                f"plot          {finding.plot}",
                "",
                "Next:",
                f"  {rerun}",
            ]
        )
    )


@cli.command("check")
@click.argument("data", type=click.Path(path_type=Path))
@fit_option("val_split", help="As in fit: the split in which train/val leakage is looked for.")
@fit_option("seed", help="As in fit: seeds the split.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check_command(data: Path, val_split: float, seed: int, as_json: bool) -> None:
    """Check every file of DATA as `finetune fit DATA` would, without training: unreadable,
    truncated, empty and non-image files, hidden folders, decompression bombs, tiny images,
    symlinks, and identical images in train and val or in two classes. Nothing is written.

    Example:

        finetune check sample_data/fashion
    """
    from finetune.inference.inputs import unreadable_files
    from finetune.pipeline import check

    report = check(data, val_split=val_split, seed=seed)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.text())
    _exit_if_skipped(unreadable_files(report))


@cli.command("cache")
@click.option(
    "--clear",
    "names",
    multiple=True,
    type=click.Choice(["all", "decoded", "features", "scan"]),
    help="Delete this cache (repeatable; all: every one). Runs rebuild what they miss.",
)
def cache_command(names: tuple[str, ...]) -> None:
    """Show what finetune keeps between runs (decoded images, features, file checks), and
    where: ~/.cache/finetune, or $FINETUNE_CACHE_DIR. --clear deletes it.

    Example:

        finetune cache --clear decoded
    """
    from finetune.data.caches import CACHES, cache_usage, clear_cache
    from finetune.data.decoded import describe_size

    if names:
        freed = clear_cache(tuple(CACHES) if "all" in names else names)
        click.echo(f"freed {describe_size(freed)}")
    usage = cache_usage()
    click.echo(f"{usage[0].folder.parent}  ($FINETUNE_CACHE_DIR moves it)")
    for u in usage:
        files = f"{u.files:,} file{'s' if u.files != 1 else ''}"
        click.echo(f"  {u.name:<9} {files:>13} {describe_size(u.bytes):>9}  {CACHES[u.name]}")


@cli.command("report")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_IMAGES,
    show_default=True,
    help="Classify at most this many validation images (a stratified sample beyond).",
)
@click.option("--device", help="cpu, cuda or cuda:N [default: the run's, when available].")
def report_command(run: Path, max_images: int, device: str | None) -> None:
    """Write RUN/report.html: one self-contained page (pictures embedded, nothing fetched) with
    the data, the strategy decision and its reasons, the augmentation, the learning curves, the
    evaluation of best.pt on the validation images (confusion matrix, per-class accuracy, the
    most confidently wrong images) and the command that reproduces the run.

    `fit` writes it at the end; run this to regenerate it, e.g. after `finetune evaluate`
    (whose results it lists).

    Example:

        finetune report runs/fashion-finetune-top-20261123-160502
    """
    from finetune.reporting.html import report

    click.echo(str(report(run, max_images=max_images, device=device, progress=True)))


@cli.command("runs")
@click.argument("folder", type=click.Path(path_type=Path), default=Path("runs"), required=False)
def runs_command(folder: Path) -> None:
    """List the runs under FOLDER (default runs/, where `fit` writes them), oldest first: strategy,
    best val accuracy, epochs done/planned, training time, date, and whether report.html exists.

    Example:

        finetune runs
    """
    from finetune.reporting.runs import list_runs, runs_table

    found = list_runs(folder)
    if not found:
        click.echo(f"No runs under {folder} (a run is a folder with config.json and metrics.csv).")
        return
    click.echo(runs_table(found, folder))


@cli.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN...")
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=Path("compare.png"),
    show_default=True,
    help="The PNG of the runs' val accuracy and val loss per epoch, overlaid.",
)
def compare_command(runs: tuple[Path, ...], out: Path) -> None:
    """Compare runs: a table (strategy, model, image size, epochs, best val acc, best epoch,
    training time) and one plot of their validation curves.

    Example:

    \b
        finetune compare runs/fashion-stage-probe-20261123-092021 \\
            runs/fashion-finetune-top-20261123-101500 -o compare.png
    """
    from finetune.reporting.runs import compare

    result = compare(runs, out)
    click.echo(result.table())
    click.echo(f"\nplot  {result.plot}")


@cli.command("strategies")
def strategies_command() -> None:
    """List the strategies `fit --strategy` accepts.

    Example:

        finetune strategies
    """
    from finetune.strategies import STRATEGIES

    width = max(map(len, STRATEGIES))
    for name, cls in STRATEGIES.items():
        click.echo(f"{name:<{width}}  {cls.summary}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="finetune")


if __name__ == "__main__":
    sys.exit(main())
