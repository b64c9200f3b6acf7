"""The run folder's one owner: every file name of a run (and of a tune) is spelled here, once.

``fit`` writes, ``resume``, ``predict``, ``export``, ``report`` and ``runs`` read back; each asks a
:class:`RunDir` for the path instead of joining a name of its own, so renaming a file, or
finding everything a run holds, is a change in this module alone (a test greps the package for
the names). The names are those finetune has always written: runs of earlier versions load,
resume and report unchanged.

A run folder::

    best.pt  last.pt  ema.pt  snapshot-K.pt      checkpoints (finetune.run.checkpoint)
    config.json  classes.json  scan.json          what fit resolved and found
    decision.json  probe.json  tta.json           auto's reasons, the probe's points, TTA score
    metrics.csv                                   one row per finished epoch
    report.html  curves.png  augment-preview.png  the report and the pictures it embeds
    recipe.toml  eval-NAME/                       the report's recipe; finetune evaluate's output
    bundle/  model.torchscript.pt  model.onnx     finetune export's output

A tune folder (:class:`TuneDir`) holds ``trials.csv``, ``tune.png``, ``best.toml`` and one run
folder per trial (``trial-NN``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from finetune.config import CHECKPOINT_NAMES  # torch-free there: the CLI's choices
from finetune.errors import ConfigError

__all__ = ["CHECKPOINT_NAMES", "RunDir", "TuneDir", "new_folder"]

_SNAPSHOT = re.compile(r"snapshot-(\d+)\.pt")


def new_folder(out: str | Path | None, name: str, marker: str, kind: str = "run") -> Path:
    """The folder a new run (or tune: ``kind``) writes to, created: ``out``, unless it already
    holds ``marker`` (a started one), else ``runs/<name>-<time>`` (``-2``, ``-3``... when taken).

    Raises:
        ConfigError: ``out`` holds a started run (tune), which a new one must not overwrite.
    """
    if out is not None:
        folder = Path(out).expanduser()
        if (folder / marker).exists():
            raise ConfigError(
                f"{folder} already holds a {kind} ({marker}); choose another --out or remove it."
            )
    else:
        base = Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        folder, n = base, 1
        while folder.exists():
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder (``fit``'s output), by what they hold.

    Example:
        >>> run = RunDir.create(None, "fashion-linear")  # runs/fashion-linear-<time>, made
        >>> run.best, run.checkpoint("ema"), run.snapshot(2), run.metrics
    """

    path: Path

    # Names, for the messages and docs that mention them; paths come from the properties.
    BEST = "best.pt"
    LAST = "last.pt"
    EMA = "ema.pt"
    CONFIG = "config.json"
    METRICS = "metrics.csv"
    REPORT = "report.html"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())

    @classmethod
    def create(cls, out: str | Path | None, name: str) -> RunDir:
        """A new run folder: ``out``, unless a run started there (it holds ``last.pt``), else
        ``runs/<name>-<time>``; created.

        Raises:
            ConfigError: ``out`` already holds a run.
        """
        return cls(new_folder(out, name, cls.LAST))

    # --- checkpoints (finetune.run.checkpoint) ----------------------------------------------

    @property
    def best(self) -> Path:
        """The weights of the epoch with the best val accuracy."""
        return self.path / self.BEST

    @property
    def last(self) -> Path:
        """The last finished epoch, with the training state ``resume`` needs."""
        return self.path / self.LAST

    @property
    def ema(self) -> Path:
        """The moving average of the weights at its best epoch (``fit --ema``)."""
        return self.path / self.EMA

    def checkpoint(self, name: str) -> Path:
        """The checkpoint called ``name``, one of :data:`CHECKPOINT_NAMES`.

        Raises:
            ConfigError: ``name`` is not one of them.
        """
        if name not in CHECKPOINT_NAMES:
            raise ConfigError(
                f"Unknown checkpoint {name!r}; choose one of {', '.join(CHECKPOINT_NAMES)}."
            )
        return self.path / f"{name}.pt"

    def snapshot(self, cycle: int) -> Path:
        """The weights at the end of LR cycle ``cycle`` (``fit --schedule restarts``)."""
        return self.path / f"snapshot-{cycle}.pt"

    def snapshots(self) -> list[Path]:
        """The snapshot files that exist, in the order of their cycle."""
        numbered = [
            (int(match[1]), path)
            for path in self.path.glob("snapshot-*.pt")
            if (match := _SNAPSHOT.fullmatch(path.name)) and path.is_file()
        ]
        return [path for _, path in sorted(numbered)]

    def checkpoints(self) -> list[Path]:
        """Every checkpoint file the run holds: best, last, ema, then the snapshots."""
        named = [self.best, self.last, self.ema]
        return [p for p in named if p.is_file()] + self.snapshots()

    def is_run(self) -> bool:
        """Whether the folder holds a checkpoint to load (``best.pt`` or ``last.pt``)."""
        return self.best.is_file() or self.last.is_file()

    # --- records ----------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        """Every setting the run used (``FitConfig.to_dict``), resolved."""
        return self.path / self.CONFIG

    @property
    def classes(self) -> Path:
        """The class names, label i first."""
        return self.path / "classes.json"

    @property
    def scan(self) -> Path:
        """What the data scan found (``ScanReport.to_dict``): the root, skipped files, leaks."""
        return self.path / "scan.json"

    @property
    def decision(self) -> Path:
        """Auto's measurements and reasons (only when auto chose)."""
        return self.path / "decision.json"

    @property
    def probe(self) -> Path:
        """The probes' cross-validated accuracy per probe point (linear, stage-probe)."""
        return self.path / "probe.json"

    @property
    def tta(self) -> Path:
        """best.pt's val accuracy with test-time augmentation (``fit --tta``)."""
        return self.path / "tta.json"

    @property
    def metrics(self) -> Path:
        """One row per finished epoch (``EpochResult``)."""
        return self.path / self.METRICS

    def records(self) -> list[Path]:
        """The record files, in the order the report lists them (whether they exist or not)."""
        return [self.config, self.classes, self.scan, self.decision, self.metrics, self.probe,
                self.tta, self.recipe]  # fmt: skip

    # --- the report and its pictures --------------------------------------------------------

    @property
    def report(self) -> Path:
        """The self-contained HTML page about the run."""
        return self.path / self.REPORT

    @property
    def recipe(self) -> Path:
        """The run's configuration as a recipe (the report's reproduce command)."""
        return self.path / "recipe.toml"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    @property
    def augment_preview(self) -> Path:
        return self.path / "augment-preview.png"

    def evaluation(self, name: str) -> Path:
        """The folder of an evaluation on data folder ``name`` (``eval-val``: the report's)."""
        return self.path / f"eval-{name}"

    def evaluations(self) -> list[Path]:
        """The evaluation folders the run holds, by name."""
        return sorted(p for p in self.path.glob("eval-*") if p.is_dir())

    # --- exports (finetune.inference.export) ------------------------------------------------

    @property
    def bundle(self) -> Path:
        """The safetensors bundle folder."""
        return self.path / "bundle"

    @property
    def torchscript(self) -> Path:
        return self.path / "model.torchscript.pt"

    @property
    def onnx(self) -> Path:
        return self.path / "model.onnx"

    def exports(self) -> list[Path]:
        """The exports that exist: bundle, TorchScript, ONNX."""
        return [p for p in (self.bundle, self.torchscript, self.onnx) if p.exists()]


@dataclass(frozen=True)
class TuneDir:
    """The files of a tune folder (``finetune tune``'s output)."""

    path: Path

    TRIALS = "trials.csv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())

    @classmethod
    def create(cls, out: str | Path | None, name: str) -> TuneDir:
        """A new tune folder: ``out``, unless a tune started there (it holds ``trials.csv``),
        else ``runs/<name>-<time>``; created.

        Raises:
            ConfigError: ``out`` already holds a tune.
        """
        return cls(new_folder(out, name, cls.TRIALS, kind="tune"))

    @property
    def trials(self) -> Path:
        """One row per trial."""
        return self.path / self.TRIALS

    @property
    def plot(self) -> Path:
        """Val accuracy against the learning rate, coloured by weight decay."""
        return self.path / "tune.png"

    @property
    def best_recipe(self) -> Path:
        """The base config with the best trial's learning rate and weight decay."""
        return self.path / "best.toml"

    def trial(self, number: int, of: int) -> RunDir:
        """Trial ``number``'s run folder, numbered with as many digits as ``of`` needs (>= 2)."""
        return RunDir(self.path / f"trial-{number:0{max(2, len(str(of)))}d}")
