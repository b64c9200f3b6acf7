"""The run folder's one owner: every file name of a run (and of a tune) is spelled here, once.

``fit`` writes, ``resume``, ``predict``, ``export``, ``report`` and ``runs`` read back; each asks a
:class:`RunDir` for the path instead of joining a name of its own, so renaming a file, or
finding everything a run holds, is a change in this module alone (a test greps the package for
the names). The names are those finetune has always written: runs of earlier versions load,
resume and report unchanged.

A run folder::

    best.pt  last.pt  ema.pt  snapshot-K.pt      checkpoints (finetune.run.checkpoint)
    config.json  classes.json  scan.json          what fit resolved and found
    split.json                                    the files of each side, with their hashes
    run.lock                                      while a fit or resume writes the folder
    decision.json  probe.json  tta.json           auto's reasons, the probe's points, TTA score
    baseline/  finetune-best.pt                   auto's probe baseline (a run folder); the
                                                  fine-tune's best when the baseline won
    metrics.csv                                   one row per finished epoch
    report.html  curves.png  augment-preview.png  the report and the pictures it embeds
    recipe.toml  eval-NAME/                       the report's recipe; finetune evaluate's output
    bundle/  model.torchscript.pt  model.onnx     finetune export's output

``fit`` claims a run folder before it writes there: it creates the folder exclusively, or takes
one that is new or empty, and holds ``run.lock`` (created with ``O_EXCL``; it records the pid and
the host) until it ends, success, error or Ctrl-C alike; ``fit --resume`` holds it too. A lock
whose process is gone (killed with SIGKILL, the machine rebooted) is taken over; one from
another host, or that cannot be read, is refused with the command that removes it.

A tune folder (:class:`TuneDir`) holds ``trials.csv``, ``tune.png``, ``best.toml`` and one run
folder per trial (``trial-NN``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune.config import CHECKPOINT_NAMES  # torch-free there: the CLI's choices
from finetune.errors import ConfigError
from finetune.files import file_mode

__all__ = ["CHECKPOINT_NAMES", "RunDir", "TuneDir", "new_folder"]

_SNAPSHOT = re.compile(r"snapshot-(\d+)\.pt")


def _default_folder(name: str) -> Path:
    """``runs/<name>-<time>`` (``-2``, ``-3``... when taken), created here and now: ``mkdir``
    without ``exist_ok`` is the claim, so two fits started in the same second never share one.
    """
    base = Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    base.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            folder.mkdir()
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
            continue
        return folder


def _writable_folder(folder: Path, option: str) -> None:
    """Refuse ``folder`` (the value of ``option``) when it is a file, lies below a file or
    cannot be created: the reason, not a traceback."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder} is a file; give a folder (a new or empty one).")
    for parent in folder.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ConfigError(
                    f"{option} {folder} lies below {parent}, which is a file; give a folder."
                )
            if not folder.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"{option} {folder} cannot be created: {parent} is not writable; choose "
                    "another folder."
                )
            break


def new_folder(out: str | Path | None, name: str, marker: str, kind: str = "run") -> Path:
    """The folder a new run (or tune: ``kind``) writes to, created: ``out``, unless it already
    holds ``marker`` (a started one), else ``runs/<name>-<time>`` (``-2``, ``-3``... when taken).

    Raises:
        ConfigError: ``out`` holds a started run (tune), which a new one must not overwrite.
    """
    if out is None:
        return _default_folder(name)
    folder = Path(out).expanduser()
    _writable_folder(folder, "--out")
    if (folder / marker).exists():
        raise ConfigError(
            f"{folder} already holds a {kind} ({marker}); choose another --out or remove it."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {folder} cannot be created: {exc.strerror or exc}.") from exc
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
    LOCK = "run.lock"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())

    @classmethod
    def create(cls, out: str | Path | None, name: str) -> RunDir:
        """A new run folder, claimed for this process: ``out`` (created, or an empty folder),
        else ``runs/<name>-<time>`` (created exclusively). The lock is held: call
        :meth:`unlock` when the run ends, however it ends.

        Raises:
            ConfigError: ``out`` is a file, lies below one or cannot be created; it is in use by
                another fit; it holds a run (``last.pt``: resume it) or other files.
        """
        if out is None:
            run = cls(_default_folder(name))
            run.lock()
            return run
        run = cls(out)
        run.check_new()
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"--out {run.path} cannot be created: {exc.strerror or exc}."
            ) from exc
        run.lock()
        try:
            run.check_new()  # again, holding the lock: no other fit can write there meanwhile
        except BaseException:
            run.unlock()
            raise
        return run

    def check_new(self) -> None:
        """Refuse this folder as a new run's ``--out`` unless it is new or empty, before any time
        is spent: ``fit`` calls it first, and again once it holds the lock.

        Raises:
            ConfigError: The folder is a file, lies below one or cannot be created; another
                fit holds it; it holds a run (``last.pt``) or files that are not finetune's
                to overwrite (the message names the folder and some of them).
        """
        _writable_folder(self.path, "--out")
        if not self.path.is_dir():
            return
        holder = _read_lock(self.lock_file)
        if holder is not None and not _mine(holder) and not _stale(holder):
            raise ConfigError(_busy(self.path, self.lock_file, holder))
        if self.last.exists():
            raise ConfigError(
                f"{self.path} already holds a run (last.pt); continue it with "
                f"`finetune fit --resume {self.path}`, or choose another --out."
            )
        try:
            entries = sorted(p.name for p in self.path.iterdir() if p.name != self.LOCK)
        except OSError as exc:
            raise ConfigError(
                f"--out {self.path} cannot be read: {exc.strerror or exc}; choose another --out."
            ) from exc
        if entries:
            listed = ", ".join(entries[:5]) + (
                f" and {len(entries) - 5} more" if len(entries) > 5 else ""
            )
            records = {p.name for p in (*self.records(), self.split, self.report, self.curves)}
            hint = (
                " (it looks like a run stopped before its first epoch ended, which has nothing "
                "to resume: remove the folder to start it again there)"
                if set(entries) <= records and {self.CONFIG, self.scan.name} <= set(entries)
                else ""
            )
            raise ConfigError(
                f"--out {self.path} is not empty (it holds {listed}) and is not a run to "
                f"resume{hint}; fit writes only into a new or empty folder and never overwrites "
                "what is there: choose another --out."
            )

    # --- the lock: one fit or resume at a time ----------------------------------------------

    @property
    def lock_file(self) -> Path:
        """Held by the fit (or resume) writing the folder: its pid, host and start time."""
        return self.path / self.LOCK

    def lock(self) -> None:
        """Claim the folder for this process: ``run.lock`` created with ``O_EXCL``, so of two
        processes exactly one gets it. A lock left by a process that is gone (SIGKILL, a
        reboot) on this host is taken over.

        Raises:
            ConfigError: Another live process holds it, or it is from another host or cannot be
                read (the message says how to remove it if no fit is running).
        """
        record = {
            "pid": os.getpid(),
            "host": _host(),
            "started": datetime.now().isoformat(timespec="seconds"),
        }
        for attempt in range(2):
            try:
                fd = os.open(self.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
            except FileExistsError:
                holder = _read_lock(self.lock_file)
                if attempt == 0 and holder is not None and _stale(holder):
                    self.lock_file.unlink(missing_ok=True)  # its process is gone
                    continue
                raise ConfigError(_busy(self.path, self.lock_file, holder)) from None
            except OSError as exc:
                raise ConfigError(
                    f"Cannot write into {self.path}: {exc.strerror or exc}; choose another --out."
                ) from exc
            with os.fdopen(fd, "w") as file:
                file.write(json.dumps(record) + "\n")
            return

    def unlock(self) -> None:
        """Release the lock if this process holds it (another process's lock is never removed)."""
        holder = _read_lock(self.lock_file)
        if holder is not None and _mine(holder):
            self.lock_file.unlink(missing_ok=True)

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

    @property
    def finetune_best(self) -> Path:
        """The fine-tune's best epoch, when ``auto`` kept its probe baseline in ``best.pt``
        because the probe scored higher on val."""
        return self.path / "finetune-best.pt"

    @property
    def baseline(self) -> RunDir:
        """The probe ``auto`` fits before a fine-tune, a run folder of its own: the fine-tune
        must beat its val accuracy, else ``best.pt`` becomes the probe's."""
        return RunDir(self.path / "baseline")

    def checkpoints(self) -> list[Path]:
        """Every checkpoint file the run holds: best, last, ema, the fine-tune's best when the
        baseline was kept, then the snapshots."""
        named = [self.best, self.last, self.ema, self.finetune_best]
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
    def split(self) -> Path:
        """Which files trained and which validated (paths relative to the data folder, with
        their SHA-1), so that ``resume`` continues on the same split whatever was added."""
        return self.path / "split.json"

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


def _read_lock(file: Path) -> dict[str, Any] | None:
    """The lock's record; None when there is no lock, ``{}`` when it cannot be read (a
    process between creating it and writing it, or a damaged file)."""
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _mine(holder: dict[str, Any]) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == _host()


def _stale(holder: dict[str, Any]) -> bool:
    """Whether the lock's process is gone: only knowable on the host that wrote it."""
    pid = holder.get("pid")
    if holder.get("host") != _host() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, run by another user
        return False
    try:  # a killed process its parent has not waited for yet is a zombie: gone all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _busy(folder: Path, lock: Path, holder: dict[str, Any] | None) -> str:
    if holder:
        who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
        return (
            f"{folder} is in use by another finetune fit or resume ({who}); wait for it to end "
            f"or use another folder. If no such process is running, remove {lock}."
        )
    return (
        f"{folder} is locked ({lock} exists but cannot be read); if no finetune fit or resume is "
        f"writing there, remove {lock}."
    )


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


def _host() -> str:
    """This machine's name, for a lock's holder (socket is imported here: `--help` skips it)."""
    import socket

    return socket.gethostname()
