"""Many run folders -> a table (``finetune runs``) or an overlay plot (``finetune compare``)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import CheckpointError
from finetune.run.layout import RunDir
from finetune.training.loop import EpochResult, read_metrics

if TYPE_CHECKING:
    pass

__all__ = [
    "Comparison",
    "RunSummary",
    "compare",
    "compare_table",
    "list_runs",
    "read_run",
    "runs_table",
]


@dataclass(frozen=True)
class RunSummary:
    """The key facts of one run directory, read from its config.json and metrics.csv."""

    dir: Path
    config: dict[str, Any]  # config.json: every setting the run used
    history: tuple[EpochResult, ...]  # metrics.csv, one row per finished epoch
    date: datetime  # when the last epoch was written (metrics.csv's modification time)

    @property
    def strategy(self) -> str:
        return str(self.config.get("strategy"))

    @property
    def model(self) -> str:
        return str(self.config.get("model"))

    @property
    def image_size(self) -> int | None:
        return self.config.get("image_size")

    @property
    def planned_epochs(self) -> int:
        return int(self.config.get("epochs") or len(self.history))

    @property
    def best(self) -> EpochResult:
        """The epoch whose weights are in best.pt."""
        best = [r for r in self.history if r.best]
        return best[-1] if best else self.history[-1]

    @property
    def seconds(self) -> float:
        """Training time: the epochs' seconds summed (the data scan and model load excluded)."""
        return sum(r.seconds for r in self.history)

    @property
    def report(self) -> Path | None:
        path = RunDir(self.dir).report
        return path if path.is_file() else None


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` produced."""

    runs: tuple[RunSummary, ...]
    plot: Path  # val accuracy and val loss per epoch of every run, overlaid

    def table(self) -> str:
        return compare_table(self.runs)


def read_run(run_dir: str | Path) -> RunSummary:
    """Read a run directory's ``config.json`` and ``metrics.csv``.

    Raises:
        CheckpointError: ``run_dir`` is not a run directory of ``finetune fit``, or no epoch
            of it finished.
    """
    run = RunDir(run_dir)
    run_dir, config_file, metrics_file = run.path, run.config, run.metrics
    if not config_file.is_file() or not metrics_file.is_file():
        missing = (config_file if not config_file.is_file() else metrics_file).name
        raise CheckpointError(
            f"{run_dir} is not a run directory of `finetune fit` (it has no {missing}). Give "
            "a folder that fit wrote, e.g. runs/<name>; `finetune runs` lists them."
        )
    try:
        config = json.loads(config_file.read_text())
        history = tuple(read_metrics(metrics_file))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{run_dir}: cannot read config.json / metrics.csv ({exc}); were they edited?"
        ) from exc
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{config_file} holds a JSON {type(config).__name__}, not the run's settings (an "
            "object); was it edited?"
        )
    if not history:
        raise _NoEpoch(
            f"{run_dir}: no epoch finished (metrics.csv has no rows), so there is nothing to "
            f"report. Continue it with `finetune fit --resume {run_dir}` or start it again."
        )
    date = datetime.fromtimestamp(metrics_file.stat().st_mtime)
    return RunSummary(run_dir, config, history, date)


class _NoEpoch(CheckpointError):
    """A run killed before its first epoch ended: nothing to list, nothing wrong with it."""


def list_runs(root: str | Path = "runs") -> list[RunSummary]:
    """The runs under ``root`` (its sub-folders, and the trials of a ``finetune tune`` folder
    one level deeper), oldest first; folders whose first epoch never finished are left out,
    and one whose records cannot be read is left out with a warning naming it (one damaged
    folder never hides the others).

    Raises:
        CheckpointError: ``root`` is not a folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CheckpointError(
            f"{root} is not a folder. `finetune runs` lists the run directories under a folder "
            "(default runs/, where `finetune fit` writes them); give that folder."
        )
    found = []
    for depth in ("", "*/", "*/*/"):
        for metrics in root.glob(depth + RunDir.METRICS):
            try:
                found.append(read_run(metrics.parent))
            except _NoEpoch:
                continue  # killed before its first epoch ended: nothing to list
            except CheckpointError as exc:
                warnings.warn(f"skipped {metrics.parent}: {exc}", stacklevel=2)
    return sorted(found, key=lambda run: (run.date, str(run.dir)))


def runs_table(runs: Sequence[RunSummary], root: Path | None = None) -> str:
    """A text table of runs: strategy, best val acc, epochs, training time and date."""
    names = [_name(run.dir, root) for run in runs]
    header = ["run", "strategy", "val acc", "epochs", "train time", "date", "report"]
    rows = [
        [
            name,
            run.strategy,
            f"{run.best.val_acc:.3f}",
            f"{len(run.history)}/{run.planned_epochs}",
            duration(run.seconds),
            run.date.strftime("%Y-%m-%d %H:%M"),
            "yes" if run.report else "-",
        ]
        for name, run in zip(names, runs, strict=True)
    ]
    return _text_table(header, rows, right={2, 3, 4})


def compare(run_dirs: Iterable[str | Path], out: str | Path = "compare.png") -> Comparison:
    """Read several runs and plot their validation accuracy and loss per epoch in one PNG.

    Raises:
        CheckpointError: Fewer than one run, or a path that is not a run directory.
    """
    from finetune.reporting.figures import compare_figure, save_png

    runs = tuple(read_run(d) for d in run_dirs)
    if not runs:
        raise CheckpointError("compare needs at least one run directory (two to compare).")
    labels = _labels([run.dir for run in runs])
    figure = compare_figure([(label, run.history) for label, run in zip(labels, runs, strict=True)])
    return Comparison(runs, save_png(figure, out))


def compare_table(runs: Sequence[RunSummary]) -> str:
    """A text table: strategy, model, image size, epochs, best val acc, best epoch, time."""
    header = ["run", "strategy", "model", "px", "epochs", "best val acc", "best epoch",
              "train time"]  # fmt: skip
    rows = [
        [
            label,
            run.strategy,
            run.model,
            str(run.image_size),
            f"{len(run.history)}/{run.planned_epochs}",
            f"{run.best.val_acc:.3f}",
            str(run.best.epoch),
            duration(run.seconds),
        ]
        for label, run in zip(_labels([r.dir for r in runs]), runs, strict=True)
    ]
    return _text_table(header, rows, right={3, 4, 5, 6, 7})


def _name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return path.name


def _labels(dirs: Sequence[Path]) -> list[str]:
    """Short names for runs: the folder names, or the paths where two names are the same."""
    names = [d.name for d in dirs]
    return names if len(set(names)) == len(names) else [_shown(d) for d in dirs]


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


REPORT_NAME = RunDir.REPORT  # the name finetune.reporting.html has always exported


def _shown(path: Path | str | None) -> str:
    """``path`` relative to the working directory when it is inside it (as people type it)."""
    if path is None:
        return ""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def duration(seconds: float, digits: int = 1) -> str:
    """``seconds`` in the unit a reader takes in at once: s under 90 s, min under 90 min, else h
    (hours always with one decimal)."""
    if seconds < 90:
        return f"{seconds:.{digits}f} s"
    if seconds < 5400:
        return f"{seconds / 60:.{digits}f} min"
    return f"{seconds / 3600:.1f} h"
