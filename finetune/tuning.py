"""``finetune.tune``: random search of the learning rate and weight decay, coarse then fine.

The search CS231n (lecture 6) recommends: random rather than grid points, sampled on log
scales, in two stages. The coarse stage (about 2/3 of the trials, a third of the epochs) spans
two decades of LR around the optimizer's default and four of weight decay; the fine stage
(the rest, full epochs) samples a narrowed range, /3 to x3, around the best coarse trial.
Every trial is an ordinary ``finetune.fit`` run in ``<tune dir>/trial-NN``, with the same
strategy, split and seed.

With ``auto`` (the default) the strategy is searched too: auto decides once, before the first
trial; trial 0 is the probe of the decided row of the matrix (``linear`` or ``stage-probe``:
one pass, its regularisation cross-validated, nothing to tune), then the coarse and fine
trials search the learning rate and weight decay of that row's fine-tune (``finetune-top`` or
``finetune-all``, whichever auto chose, or the one beside the probe it chose). The best of the
probe and the full-length fine-tune trials wins, so ``best.toml`` may be the probe's recipe.

Outputs: ``trials.csv``, ``tune.png`` (val acc against LR, coloured by weight decay) and
``best.toml``, a recipe for ``finetune fit --recipe``.

(The module is ``tuning``, not ``tune``: importing a submodule ``finetune.tune`` would replace
the function ``finetune.tune`` on the package, as ``finetune.export`` once was.)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.config import DEFAULT_EPOCHS, DEFAULT_LR, PROBE_OF, FitConfig
from finetune.errors import ConfigError, TrainingError
from finetune.files import atomic_write
from finetune.recipes import write_recipe
from finetune.run.layout import TuneDir

__all__ = [
    "COARSE_FRACTION",
    "COARSE_LR_SPAN",
    "FINE_SPAN",
    "FINE_TUNE_OF",
    "WEIGHT_DECAY_RANGE",
    "Probe",
    "Stage",
    "Trial",
    "TuneResult",
    "tune",
]

COARSE_FRACTION = 2 / 3  # of the trials, in the coarse stage
COARSE_LR_SPAN = 10.0  # coarse LR: the centre (--lr, else the optimizer's default) / 10 .. x 10
WEIGHT_DECAY_RANGE = (1e-5, 1e-1)  # coarse weight decay, log-uniform
FINE_SPAN = 3.0  # fine: the best coarse trial's LR and weight decay / 3 .. x 3
CSV_FIELDS = ("trial", "stage", "lr", "weight_decay", "epochs", "val_acc", "val_loss", "seconds",
              "run_dir")  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """One stage of the search: where it samples and for how long each trial trains."""

    name: str  # "coarse" or "fine"
    trials: int  # planned (the budget may stop the stage sooner)
    epochs: int
    lr: tuple[float, float]  # log-uniform range
    weight_decay: tuple[float, float]  # log-uniform range
    around: int | None = None  # fine: the coarse trial the ranges are centred on


# The fine-tune of each probe's row of the matrix (config.PROBE_OF the other way round).
FINE_TUNE_OF = {probe: fine for fine, probe in PROBE_OF.items()}


@dataclass(frozen=True)
class Probe:
    """The probe ``tune`` with ``auto`` fits first (trial 0)."""

    strategy: str  # "linear" or "stage-probe"
    image_size: int | None  # auto's size for it (None: the fine-tunes')


@dataclass(frozen=True)
class Trial:
    """One training run of the search (one row of ``trials.csv``)."""

    trial: int  # 1-based; 0: the probe (auto)
    stage: str  # "coarse", "fine" or "probe"
    lr: float  # NaN for the probe: a logistic regression, regularised by cross-validation
    weight_decay: float
    epochs: int
    val_acc: float  # of the best epoch; NaN when the loss diverged
    val_loss: float
    seconds: float  # wall time of the whole fit
    run_dir: Path

    @property
    def diverged(self) -> bool:
        return math.isnan(self.val_acc)


@dataclass(frozen=True)
class TuneResult:
    """What ``tune`` found."""

    dir: Path  # the tune directory: trials.csv, tune.png, best.toml, trial-NN/
    data: Path
    strategy: str  # the strategy every trial trained (auto's choice when auto was asked for)
    config: FitConfig  # the base every trial started from (before its lr, weight decay, epochs)
    stages: tuple[Stage, ...]  # the stages that ran at least one trial
    trials: tuple[Trial, ...]  # the probe's first (trial 0), when auto searched the strategy
    requested: int  # trials asked for (the probe not counted)
    stopped: str | None  # why fewer trials ran (the budget), else None
    seconds: float
    probe: Probe | None = None  # auto: the probe fit as trial 0

    @property
    def best_strategy(self) -> str:
        """The strategy of the best trial (the probe's, when it beat the fine-tunes)."""
        if self.probe is not None and self.best.stage == "probe":
            return self.probe.strategy
        return self.strategy

    @property
    def best(self) -> Trial:
        """The trial with the best val acc (then val loss) among those that trained the full
        epochs (the fine stage), or among all when none did: like is compared with like."""
        return _best(self.trials, self.config.epochs or DEFAULT_EPOCHS)

    @property
    def recipe(self) -> Path:
        """``best.toml``: the base config with the best trial's LR and weight decay."""
        return TuneDir(self.dir).best_recipe

    @property
    def trials_csv(self) -> Path:
        return TuneDir(self.dir).trials

    @property
    def plot(self) -> Path:
        return TuneDir(self.dir).plot

    def table(self) -> str:
        """The trials as a text table for people, the best one marked with ``*``."""
        best = self.best
        lines = ["trial  stage   epochs        lr  weight decay  val acc  val loss    time"]
        for t in self.trials:
            acc = "diverged" if t.diverged else f"{t.val_acc:.3f}"
            loss = "" if t.diverged else f"{t.val_loss:.3f}"
            lr, wd = ("-", "-") if t.stage == "probe" else (f"{t.lr:.2e}", f"{t.weight_decay:.2e}")
            lines.append(
                f"{t.trial:>5}  {t.stage:<6}  {t.epochs:>6}  {lr:>8}  {wd:>12}"
                f"  {acc:>7}  {loss:>8}  {t.seconds:>5.0f}s" + ("  *" if t is best else "")
            )
        return "\n".join(lines)


def tune(
    data: str | Path,
    config: FitConfig | None = None,
    *,
    trials: int = 8,
    budget_minutes: float | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    verbose: bool = True,
    **options: object,
) -> TuneResult:
    """Search the learning rate and weight decay of a fine-tune by random search on log scales.

    Args:
        data: The image folder, as for :func:`finetune.fit`.
        config: Base configuration (e.g. a recipe); ``options`` override its fields. Its ``lr``,
            when set, is the centre of the coarse LR range (else the optimizer's default LR);
            its ``epochs`` are the fine stage's, a third of them the coarse stage's. Its
            ``out`` is not used: each trial runs in ``<out>/trial-NN``.
        trials: How many trials: about 2/3 coarse, the rest fine.
        budget_minutes: Launch no trial that would end past this many minutes from the start,
            as estimated from the trials so far (the first one always runs).
        out: The tune directory [default: ``runs/<data>-tune-<time>/``].
        seed: Seeds the sampling of the search (the trials train with ``config.seed``).
        verbose: Print the search plan and one line per trial to stderr.
        **options: Fields of :class:`FitConfig`, e.g. ``strategy="finetune-top", epochs=6``.

    Returns:
        A :class:`TuneResult`; its directory holds trials.csv, tune.png, best.toml and a run
        directory per trial.

    Raises:
        ConfigError: The strategy is (or auto chooses) a probe, which has no LR to tune; or
            ``trials`` / ``budget_minutes`` is not positive.
        TrainingError: A trial was interrupted (the finished trials are kept), or every trial
            diverged.

    Example:
        >>> result = finetune.tune("sample_data/fashion", strategy="finetune-top", trials=8)
        >>> run = finetune.fit("sample_data/fashion", finetune.load_recipe(result.recipe))
    """
    started = time.perf_counter()
    if trials < 1:
        raise ConfigError(f"trials must be at least 1, got {trials}.")
    if budget_minutes is not None and not budget_minutes > 0:
        raise ConfigError(f"budget must be a positive number of minutes, got {budget_minutes}.")
    config = FitConfig.from_kwargs(config, **options)
    base, probe = _trial_base(data, dataclasses.replace(config, out=None), verbose)
    full = base.epochs or DEFAULT_EPOCHS
    base = dataclasses.replace(base, epochs=full)
    n_coarse = trials if trials == 1 else min(trials - 1, max(1, round(trials * COARSE_FRACTION)))
    centre = base.lr or DEFAULT_LR[base.optimizer]
    coarse = Stage(
        "coarse",
        n_coarse,
        _coarse_epochs(base, full),
        (centre / COARSE_LR_SPAN, centre * COARSE_LR_SPAN),
        WEIGHT_DECAY_RANGE,
    )
    tune_dir = _tune_dir(out, data)
    rng = np.random.default_rng(seed)
    _say(
        verbose,
        f"tune      {base.strategy} on {data}: {trials} trials, {n_coarse} coarse of "
        f"{coarse.epochs} epoch(s) then {trials - n_coarse} fine of {full}; log-uniform lr "
        f"{_range(coarse.lr)}, weight decay {_range(coarse.weight_decay)}"
        + (f"; budget {budget_minutes:g} min" if budget_minutes is not None else ""),
    )

    done: list[Trial] = []
    stages: list[Stage] = []  # those that ran a trial
    stopped = None
    stage = coarse
    first: list[Trial] = []  # the probe, when auto searches the strategy too
    if probe is not None:
        _say(verbose, f"probe     trial 0: the {probe.strategy} probe of auto's row, for the "
                      f"fine-tunes to beat")  # fmt: skip
        run_dir = TuneDir(tune_dir).trial(0, of=trials).path
        first = [_run_probe(data, base, probe, run_dir)]
        _write_csv(TuneDir(tune_dir).trials, first)
        _say(verbose, _trial_line(first[0], trials))
    while len(done) < trials:
        if len(done) == n_coarse:
            stage = _fine_stage(done, trials - n_coarse, full)
            _say(
                verbose,
                f"fine      around trial {stage.around}: lr {_range(stage.lr)}, weight decay "
                f"{_range(stage.weight_decay)}, {full} epoch(s)",
            )
        lr, weight_decay = (_log_uniform(rng, *span) for span in (stage.lr, stage.weight_decay))
        if budget_minutes is not None and done:
            stopped = _over_budget(done, stage, time.perf_counter() - started, budget_minutes)
            if stopped is not None:
                _say(verbose, f"budget    {stopped}")
                break
        if stage not in stages:
            stages.append(stage)
        run_dir = TuneDir(tune_dir).trial(len(done) + 1, of=trials).path
        try:
            done.append(_run_trial(data, base, stage, len(done) + 1, lr, weight_decay, run_dir))
        except TrainingError as exc:  # interrupted: keep what finished, then stop
            _write_outputs(tune_dir, first + done, base, data, stages, probe)
            raise TrainingError(
                f"tune stopped in trial {len(done) + 1}: {exc} The {len(first + done)} finished "
                f"trial(s) are in {TuneDir(tune_dir).trials}."
            ) from exc
        _write_csv(TuneDir(tune_dir).trials, first + done)
        _say(verbose, _trial_line(done[-1], trials))
    result = TuneResult(
        dir=tune_dir,
        data=Path(data),
        strategy=base.strategy,
        config=base,
        stages=tuple(stages),
        trials=tuple(first + done),
        requested=trials,
        stopped=stopped,
        seconds=time.perf_counter() - started,
        probe=probe,
    )
    _write_outputs(tune_dir, first + done, base, data, stages, probe)
    return result


def _run_probe(data: str | Path, base: FitConfig, probe: Probe, run_dir: Path) -> Trial:
    """Trial 0: the probe of auto's row, one real ``fit`` (features once, a logistic
    regression whose regularisation is cross-validated: nothing here to search)."""
    from finetune.pipeline import fit

    config = dataclasses.replace(
        base, strategy=probe.strategy, image_size=probe.image_size or base.image_size,
        epochs=None, unfreeze=None, out=str(run_dir),
    )  # fmt: skip
    begun = time.perf_counter()
    best = fit(data, config, verbose=False, report=False).best
    seconds = time.perf_counter() - begun
    return Trial(0, "probe", math.nan, math.nan, 1, best.val_acc, best.val_loss, seconds, run_dir)


def _run_trial(
    data: str | Path,
    base: FitConfig,
    stage: Stage,
    number: int,
    lr: float,
    weight_decay: float,
    run_dir: Path,
) -> Trial:
    """One real ``fit``; a loss that diverged gives a NaN trial, an interruption raises."""
    from finetune.pipeline import fit

    config = dataclasses.replace(
        base, lr=lr, weight_decay=weight_decay, epochs=stage.epochs, out=str(run_dir)
    )
    begun = time.perf_counter()
    try:
        best = fit(data, config, verbose=False, report=False).best  # the table is the report
        val_acc, val_loss = best.val_acc, best.val_loss
    except TrainingError as exc:
        if not _diverged(exc):
            raise
        val_acc = val_loss = math.nan
    seconds = time.perf_counter() - begun
    return Trial(
        number, stage.name, lr, weight_decay, stage.epochs, val_acc, val_loss, seconds, run_dir
    )


def _over_budget(
    done: list[Trial], stage: Stage, elapsed: float, budget_minutes: float
) -> str | None:
    """Why the next trial of ``stage`` would not fit the budget, or None if it would.

    Its time is estimated as seconds per epoch over the trials so far (their start-up
    included, so a longer trial is over- rather than underestimated) x its epochs.
    """
    per_epoch = sum(t.seconds for t in done) / sum(t.epochs for t in done)
    expected = per_epoch * stage.epochs
    if elapsed + expected <= budget_minutes * 60:
        return None
    return (
        f"stopped after {len(done)} trial(s): the next ({stage.name}, {stage.epochs} "
        f"epoch(s), ~{expected:.0f} s) would end at {(elapsed + expected) / 60:.1f} min, past "
        f"the {budget_minutes:g} min budget"
    )


# --- stages ----------------------------------------------------------------------------------


def _trial_base(
    data: str | Path, config: FitConfig, verbose: bool
) -> tuple[FitConfig, Probe | None]:
    """``config`` with the strategy of the searched trials fixed, and with ``auto`` the probe
    to fit first: auto decides once here; its row's fine-tune is searched (the one it chose,
    or the one beside the probe it chose) and its row's probe is trial 0."""
    from finetune.pipeline import plan
    from finetune.strategies import get_strategy

    if config.strategy != "auto":
        if not get_strategy(config.strategy).trains_backbone:
            raise ConfigError(
                f"--strategy {config.strategy} fits a logistic regression whose regularisation "
                f"is chosen by cross-validation: it has no learning rate or weight decay to "
                f"tune; tune a fine-tune instead: --strategy finetune-top or --strategy "
                f"finetune-all, or leave --strategy auto to compare the probe with them."
            )
        return config, None
    planned = plan(data, config, verbose=verbose)
    # auto's other choices (sized to this machine) hold for every trial too.
    decided = {
        name: getattr(planned.config, name)
        for name in ("epochs", "image_size", "unfreeze")
        if getattr(config, name) is None
    }
    if planned.trains_backbone:
        size = getattr(planned.decision, "baseline_image_size", None)
        probe = Probe(PROBE_OF[planned.strategy], size or decided.get("image_size"))
        return dataclasses.replace(config, strategy=planned.strategy, **decided), probe
    # A probe chosen: its row's fine-tune is searched, for as many epochs as asked (or the
    # default: the probe's one pass says nothing of them) at the probe's image size.
    probe = Probe(planned.strategy, planned.config.image_size)
    fine = FINE_TUNE_OF[planned.strategy]
    decided["epochs"] = config.epochs
    if decided.get("unfreeze") is not None and fine != "finetune-top":
        decided["unfreeze"] = None
    return dataclasses.replace(config, strategy=fine, **decided), probe


def _coarse_epochs(base: FitConfig, full: int) -> int:
    """A third of the epochs (at least 1), raised if the config needs more (warm-up epochs)."""
    for epochs in range(max(1, full // 3), full):
        try:
            dataclasses.replace(base, epochs=epochs)
        except ConfigError:
            continue
        return epochs
    return full


def _fine_stage(done: list[Trial], trials: int, epochs: int) -> Stage:
    coarse = [t for t in done if not t.diverged and t.stage == "coarse"]
    if not coarse:
        low = min(t.lr for t in done)
        raise TrainingError(
            f"All {len(done)} coarse trials diverged (NaN loss), the lowest at lr {low:.2e}; "
            "tune again with a lower --lr (the centre of the coarse range)."
        )
    best = max(coarse, key=_score)
    return Stage(
        "fine",
        trials,
        epochs,
        (best.lr / FINE_SPAN, best.lr * FINE_SPAN),
        (best.weight_decay / FINE_SPAN, best.weight_decay * FINE_SPAN),
        around=best.trial,
    )


def _score(trial: Trial) -> tuple[float, float]:
    return (trial.val_acc, -trial.val_loss)


def _best(trials: tuple[Trial, ...] | list[Trial], full_epochs: int) -> Trial:
    finite = [t for t in trials if not t.diverged]
    if not finite:
        raise TrainingError(f"All {len(trials)} trials diverged (NaN loss); try a lower --lr.")
    searched = [t for t in finite if t.stage != "probe"]
    full = [t for t in searched if t.epochs == full_epochs]
    # the probe is complete in its one pass: compared with the fine-tunes of full length
    probe = [t for t in finite if t.stage == "probe"]
    return max((full or searched) + probe, key=_score)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(10 ** rng.uniform(math.log10(low), math.log10(high)))


def _diverged(exc: TrainingError) -> bool:
    """A TrainingError for a loss that stayed NaN/infinite (train.py), not an interruption."""
    return "NaN" in str(exc)


# --- outputs ---------------------------------------------------------------------------------


def _tune_dir(out: str | Path | None, data: str | Path) -> Path:
    return TuneDir.create(out, f"{Path(data).resolve().name}-tune").path


def _write_csv(path: Path, trials: list[Trial]) -> None:
    text = io.StringIO()  # csv's own line ends, as the file always had
    writer = csv.writer(text)
    writer.writerow(CSV_FIELDS)
    for t in trials:
        writer.writerow([getattr(t, name) for name in CSV_FIELDS])
    atomic_write(path, text.getvalue())


def _write_outputs(
    tune_dir: Path,
    trials: list[Trial],
    base: FitConfig,
    data: str | Path,
    stages: list[Stage],
    probe: Probe | None = None,
) -> None:
    """trials.csv, tune.png and (when a trial did not diverge) best.toml."""
    files = TuneDir(tune_dir)
    _write_csv(files.trials, trials)
    if not trials:
        return
    full = base.epochs or DEFAULT_EPOCHS
    figure = _plot(trials, stages, base.strategy, full)
    atomic_write(
        files.plot, lambda f: figure.savefig(f, dpi=120, bbox_inches="tight", format="png")
    )
    if all(t.diverged for t in trials):
        return
    best = _best(trials, full)
    searched = f"{base.strategy}" + (f" and the {probe.strategy} probe" if probe else "")
    found = (
        f"the {probe.strategy} probe"
        if probe is not None and best.stage == "probe"
        else f"lr {best.lr:.3g}, weight decay {best.weight_decay:.3g}"
    )
    header = [
        f"finetune tune: the best of {len(trials)} trials of {searched} on {data}.",
        f"Best: trial {best.trial} ({best.stage}), {found} -> val acc {best.val_acc:.3f}, val "
        f"loss {best.val_loss:.3f}",
        "Searched, log-uniform:",
        *(
            f"  {s.name}: {sum(t.stage == s.name for t in trials)} trial(s) of {s.epochs} "
            f"epoch(s), lr {_range(s.lr)}, weight decay {_range(s.weight_decay)}"
            for s in stages
        ),
        f"All trials: {files.trials} and {files.plot}.",
    ]
    if best.epochs != full and best.stage != "probe":
        header.append(
            f"Trial {best.trial} trained {best.epochs} epoch(s); this recipe trains the full "
            f"{full}."
        )
    header.append(f"Train with it: finetune fit {data} --recipe {files.best_recipe}")
    if probe is not None and best.stage == "probe":
        recipe = dataclasses.replace(
            base, strategy=probe.strategy, image_size=probe.image_size or base.image_size,
            epochs=None, unfreeze=None, out=None,
        )  # fmt: skip
    else:
        recipe = dataclasses.replace(base, lr=best.lr, weight_decay=best.weight_decay, out=None)
    write_recipe(files.best_recipe, recipe, "\n".join(header))


def _plot(trials: list[Trial], stages: list[Stage], strategy: str, full_epochs: int):  # -> Figure
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.set_xscale("log")
    # One colour scale for every tune: the coarse range (and any fine value beyond it).
    decays = [t.weight_decay for t in trials if t.stage != "probe"]
    decays += [v for s in stages for v in s.weight_decay]
    norm = LogNorm(vmin=min(decays), vmax=max(decays))
    points = None
    for name, marker in (("coarse", "o"), ("fine", "^")):
        ran = [t for t in trials if t.stage == name and not t.diverged]
        if ran:
            epochs = ran[0].epochs
            points = ax.scatter(
                [t.lr for t in ran],
                [t.val_acc for t in ran],
                c=[t.weight_decay for t in ran],
                cmap="viridis",
                norm=norm,
                marker=marker,
                s=60,
                edgecolors="black",
                linewidths=0.5,
                label=f"{name} ({epochs} epoch{'s' if epochs > 1 else ''})",
            )
    for t in trials:
        if t.stage == "probe" and not t.diverged:
            ax.axhline(t.val_acc, linestyle="--", color="grey", label="the probe (trial 0)")
    diverged = [t for t in trials if t.diverged and t.stage != "probe"]
    if diverged:
        ax.scatter([t.lr for t in diverged], [0] * len(diverged), marker="x", color="red",
                   label="diverged")  # fmt: skip
    fine = [s for s in stages if s.name == "fine"]
    if fine:
        ax.axvspan(*fine[0].lr, color="grey", alpha=0.12, label="fine lr range")
    if any(not t.diverged for t in trials) and _best(trials, full_epochs).stage != "probe":
        best = _best(trials, full_epochs)
        ax.scatter([best.lr], [best.val_acc], s=220, facecolors="none", edgecolors="red")
        ax.annotate(
            f"best: trial {best.trial}",
            (best.lr, best.val_acc),
            xytext=(0, -18),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color="red",
        )
    lrs = [t.lr for t in trials if t.stage != "probe"] + [v for s in stages for v in s.lr]
    ax.set_xlim(min(lrs) / 1.3, max(lrs) * 1.3)  # the whole searched range
    ax.margins(y=0.15)
    if points is not None:
        fig.colorbar(points, ax=ax, label="weight decay (log scale)")
    ax.set_xlabel("learning rate (head, log scale)")
    ax.set_ylabel("best val accuracy")
    ax.set_title(f"finetune tune: {strategy}, {len(trials)} trials", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _trial_line(t: Trial, total: int) -> str:
    result = (
        "diverged (NaN loss)" if t.diverged else f"val acc {t.val_acc:.3f} loss {t.val_loss:.3f}"
    )
    if t.stage == "probe":
        return f"trial {t.trial:>{len(str(total))}}/{total}  probe   {result}  {t.seconds:.1f}s"
    return (
        f"trial {t.trial:>{len(str(total))}}/{total}  {t.stage:<6}  lr {t.lr:.2e}  wd "
        f"{t.weight_decay:.2e}  {t.epochs} ep  {result}  {t.seconds:.1f}s"
    )


def _range(span: tuple[float, float]) -> str:
    return f"{span[0]:.2g}..{span[1]:.2g}"


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)
