"""Checkpoints that describe themselves, written atomically and read without unpickling code.

A checkpoint is a dict of plain values and tensors: the timm model name, the classes, the
preprocessing contract, the config, the head, the epoch and metrics, and the model/optimizer/
scheduler/RNG state. ``torch.load(weights_only=True)`` reads it, so a crafted file cannot run
code; :func:`rebuild_model` needs nothing but the checkpoint (and a custom head's module).
"""

from __future__ import annotations

import os
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune import __version__
from finetune.data.transforms import Preprocessing
from finetune.errors import CheckpointError, ConfigError
from finetune.model.backbone import Classifier, create_classifier, prune_to_stage

__all__ = [
    "CHECKPOINTS",
    "FORMAT_VERSION",
    "file_mode",
    "find_checkpoint",
    "load_checkpoint",
    "new_run_dir",
    "rebuild_model",
    "run_checkpoints",
    "save_checkpoint",
]

FORMAT_VERSION = 1
_REQUIRED = ("format_version", "model", "classes", "preprocessing", "state_dict")
# Which checkpoint of a run directory to use: best.pt, last.pt, ema.pt (fit --ema), or every
# snapshot-K.pt (fit --schedule restarts) as a snapshot ensemble.
CHECKPOINTS = ("best", "last", "ema", "snapshots")
_SNAPSHOT = re.compile(r"snapshot-(\d+)\.pt")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "finetune_version": __version__,
        **payload,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_run_dir(out: str | Path | None, name: str, marker: str, kind: str = "run") -> Path:
    """The directory a new run (or tune: ``kind``) writes to, created: ``out``, unless it
    already holds ``marker`` (a started one), else ``runs/<name>-<time>`` (``-2``, ``-3``...
    when taken)."""
    if out is not None:
        run_dir = Path(out).expanduser()
        if (run_dir / marker).exists():
            raise ConfigError(
                f"{run_dir} already holds a {kind} ({marker}); choose another --out or remove it."
            )
    else:
        base = Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        run_dir, n = base, 1
        while run_dir.exists():
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file here (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's ``best.pt`` (``last.pt`` if there is no best)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"{path} holds no best.pt or last.pt. Give a run directory written by `finetune fit` "
            "or a checkpoint file."
        )
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. Give a run directory or a checkpoint file.")
    return path


def run_checkpoints(run: str | Path, checkpoint: str = "best") -> list[Path]:
    """The checkpoint files of run directory ``run`` that ``checkpoint`` picks.

    Args:
        run: A run directory written by ``finetune fit``.
        checkpoint: One of :data:`CHECKPOINTS`: "best" (``best.pt``, or ``last.pt`` when there
            is no best), "last", "ema" (``ema.pt``, written by ``fit --ema``) or "snapshots"
            (every ``snapshot-K.pt`` in the order of K, written by ``fit --schedule restarts``).

    Raises:
        ConfigError: ``checkpoint`` is not one of :data:`CHECKPOINTS`.
        CheckpointError: The run has no such checkpoint (the message names the fit option that
            writes it).
    """
    run = Path(run).expanduser()
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(
            f"Unknown checkpoint {checkpoint!r}; choose one of {', '.join(CHECKPOINTS)}."
        )
    if checkpoint == "best":
        return [find_checkpoint(run)]
    if checkpoint == "last":
        if not (run / "last.pt").is_file():
            raise CheckpointError(
                f"{run} holds no last.pt. Give a run directory written by `finetune fit`."
            )
        return [run / "last.pt"]
    if checkpoint == "ema":
        if not (run / "ema.pt").is_file():
            raise CheckpointError(
                f"{run} holds no ema.pt: the run was trained without --ema. Train with "
                "`finetune fit --ema` (FitConfig ema=True) for EMA weights, or pick best or last."
            )
        return [run / "ema.pt"]
    numbered = [
        (int(match[1]), path)
        for path in run.glob("snapshot-*.pt")
        if (match := _SNAPSHOT.fullmatch(path.name)) and path.is_file()
    ]
    if not numbered:
        raise CheckpointError(
            f"{run} holds no snapshot-K.pt files: the run was trained without --schedule "
            "restarts. Train with `finetune fit --schedule restarts` (a snapshot after each "
            "cosine cycle) for a snapshot ensemble, or pick best, last or ema."
        )
    return [path for _, path in sorted(numbered)]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (file or run directory) without unpickling arbitrary objects."""
    file = find_checkpoint(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"Cannot load {file}: it is corrupt, or holds objects other than tensors and plain "
            f"values, which finetune refuses to unpickle ({type(exc).__name__})."
        ) from exc
    missing = [k for k in _REQUIRED if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CheckpointError(
            f"{file} is not a finetune checkpoint (missing {', '.join(missing)})."
        )
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} was written by a newer finetune (format {payload['format_version']}); "
            "upgrade finetune to read it."
        )
    return payload


def rebuild_model(checkpoint: dict[str, Any], head: nn.Module | None = None) -> Classifier:
    """The trained model described by ``checkpoint``, weights loaded, in eval mode.

    Args:
        checkpoint: As returned by :func:`load_checkpoint`.
        head: The custom head module the model was trained with, if it had one (its weights are
            loaded from the checkpoint).
    """
    import timm

    spec = checkpoint["model"]
    if spec["head"] != "linear" and head is None:
        raise CheckpointError(
            f"This model was trained with a custom head ({spec['head']}); pass an instance of it: "
            "finetune.load(path, head=MyHead(...))."
        )
    backbone = timm.create_model(spec["name"], pretrained=False, num_classes=0)
    if spec.get("stage") is not None:
        prune_to_stage(backbone, spec["stage"])
    model = create_classifier(backbone, len(checkpoint["classes"]), head)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"Checkpoint weights do not fit {spec['name']}: {exc}") from exc
    return model.eval()


def preprocessing_of(checkpoint: dict[str, Any]) -> Preprocessing:
    """The preprocessing contract stored in ``checkpoint``."""
    return Preprocessing.from_dict(checkpoint["preprocessing"])
