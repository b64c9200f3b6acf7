"""Checkpoints that describe themselves, written atomically and read without unpickling code.

A checkpoint is a dict of plain values and tensors: the description of the model
(:class:`CheckpointMeta`: the timm model name, the classes, the preprocessing contract, the
config, the head...), the epoch and metrics, and the model/optimizer/scheduler/RNG state.
``torch.load(weights_only=True)`` reads it, so a crafted file cannot run code;
:func:`rebuild_model` needs nothing but the checkpoint (and a custom head's module).
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune import __version__
from finetune.config import CHECKPOINTS  # torch-free there: the CLI's --checkpoint choices
from finetune.data.transforms import Preprocessing
from finetune.errors import CheckpointError, ConfigError
from finetune.files import atomic_write
from finetune.model.backbone import Classifier, create_classifier, prune_to_stage
from finetune.run.layout import RunDir

__all__ = [
    "CHECKPOINTS",
    "FORMAT_VERSION",
    "CheckpointMeta",
    "FrozenRecord",
    "ModelSpec",
    "add_to_checkpoint",
    "find_checkpoint",
    "is_torchscript_archive",
    "load_checkpoint",
    "not_weights",
    "preprocessing_of",
    "rebuild_model",
    "run_checkpoints",
    "save_checkpoint",
    "torch_archive_kind",
]

FORMAT_VERSION = 1
_REQUIRED = ("format_version", "model", "classes", "preprocessing", "state_dict")


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds the network without its weights: ``timm.create_model(name)``, cut after
    ``stage`` (stage-probe), topped by a head of ``num_features`` inputs."""

    name: str  # the timm model name
    num_features: int | None  # the features the head takes (None: not recorded)
    head: str = "linear"  # "linear", or "custom:<class name>" (pass the module to load it)
    stage: int | None = None  # stage-probe: the backbone keeps its stages up to this one

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            name=data["name"],
            num_features=data.get("num_features"),
            head=data.get("head", "linear"),
            stage=data.get("stage"),
        )


@dataclass(frozen=True)
class FrozenRecord:
    """How the frozen layers' outputs were computed once (``finetune-top``, cached)."""

    skipped: tuple[str, ...]  # the modules whose outputs were computed once
    views: int  # 1: each training image as it is; 2: and mirrored

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped), "views": self.views}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrozenRecord:
        return cls(skipped=tuple(data["skipped"]), views=int(data["views"]))


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything a checkpoint says about its model besides the weights and training state.

    ``fit`` builds it once; a strategy that changes the model (stage-probe cuts the backbone)
    or how it trained (the frozen layers computed once) records that with
    :func:`dataclasses.replace`, so no two stages edit one shared dict. On disk it is spread
    into the checkpoint's top level (:meth:`to_dict`), as it always was: checkpoints of earlier
    versions read back with :meth:`from_dict`.
    """

    model: ModelSpec
    classes: tuple[str, ...]  # label i is classes[i]
    preprocessing: Preprocessing  # what the model expects of an image
    data: str | None = None  # the data folder, resolved (resume scans it again)
    config: dict[str, Any] | None = None  # FitConfig.to_dict(), resolved
    strategy: str | None = None  # the strategy that ran (auto's choice when auto chose)
    decision: dict[str, Any] | None = None  # auto's Decision.to_dict(), when auto chose
    augmentation: dict[str, Any] | None = None  # the training augmentation (None: a probe)
    frozen: FrozenRecord | None = None  # the frozen layers computed once, if they were

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint keys, as plain values (``frozen`` only when set, as before)."""
        out = {
            "model": self.model.to_dict(),
            "data": self.data,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "config": self.config,
            "strategy": self.strategy,
            "decision": self.decision,
            "augmentation": self.augmentation,
        }
        if self.frozen is not None:
            out["frozen"] = self.frozen.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        """The description in a checkpoint (or a dict of its keys); the keys fit adds besides
        model, classes and preprocessing may be missing.

        Raises:
            CheckpointError: ``model``, ``classes`` or ``preprocessing`` is missing or malformed.
        """
        try:
            return cls(
                model=ModelSpec.from_dict(data["model"]),
                classes=tuple(data["classes"]),
                preprocessing=Preprocessing.from_dict(data["preprocessing"]),
                data=data.get("data"),
                config=data.get("config"),
                strategy=data.get("strategy"),
                decision=data.get("decision"),
                augmentation=data.get("augmentation"),
                frozen=FrozenRecord.from_dict(data["frozen"]) if data.get("frozen") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"The checkpoint's description is incomplete or malformed ({exc!r}); it was not "
                "written by finetune fit."
            ) from exc


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a reader never sees half a checkpoint),
    stamped with the format and finetune versions."""
    payload = {
        "format_version": FORMAT_VERSION,
        "finetune_version": __version__,
        **payload,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def add_to_checkpoint(path: Path, **values: Any) -> None:
    """Rewrite the checkpoint at ``path`` with ``values`` added to (or replacing) its top-level
    keys, atomically; what a run learns of its best weights after writing them (the test-time
    augmentation chosen on val)."""
    payload = load_checkpoint(path)
    payload.update(values)
    atomic_write(path, lambda f: torch.save(payload, f))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's ``best.pt`` (``last.pt`` if there is no best)."""
    path = Path(path).expanduser()
    if path.is_dir():
        run = RunDir(path)
        for file in (run.best, run.last):
            if file.is_file():
                return file
        raise CheckpointError(
            f"{path} holds no {RunDir.BEST} or {RunDir.LAST}. Give a run directory written by "
            "`finetune fit` or a checkpoint file."
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
    folder = RunDir(run)
    run = folder.path
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(
            f"Unknown checkpoint {checkpoint!r}; choose one of {', '.join(CHECKPOINTS)}."
        )
    if checkpoint == "best":
        return [find_checkpoint(run)]
    if checkpoint == "last":
        if not folder.last.is_file():
            raise CheckpointError(
                f"{run} holds no last.pt. Give a run directory written by `finetune fit`."
            )
        return [folder.last]
    if checkpoint == "ema":
        if not folder.ema.is_file():
            raise CheckpointError(
                f"{run} holds no ema.pt: the run was trained without --ema. Train with "
                "`finetune fit --ema` (FitConfig ema=True) for EMA weights, or pick best or last."
            )
        return [folder.ema]
    snapshots = folder.snapshots()
    if not snapshots:
        raise CheckpointError(
            f"{run} holds no snapshot-K.pt files: the run was trained without --schedule "
            "restarts. Train with `finetune fit --schedule restarts` (a snapshot after each "
            "cosine cycle) for a snapshot ensemble, or pick best, last or ema."
        )
    return snapshots


def torch_archive_kind(path: str | Path) -> str | None:
    """What a zip archive as torch writes it (``archive/data.pkl``...) holds, by its content:
    ``"torchscript"`` when it holds ``constants.pkl`` or ``code/`` below its top folder (torch's
    own test, ``_is_torchscript_zip``), ``"checkpoint"`` when it holds ``data.pkl`` only, None
    when ``path`` is no such archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    records = {name.split("/", 1)[1] for name in names if "/" in name}  # below the top folder
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        return "torchscript"
    return "checkpoint" if "data.pkl" in records else None


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a program), by its content."""
    return torch_archive_kind(path) == "torchscript"


def not_weights(path: Path) -> CheckpointError:
    """The refusal of a TorchScript archive found where a checkpoint belongs."""
    return CheckpointError(
        f"{path} is a TorchScript archive, a program, where finetune expects a checkpoint: "
        "finetune reads a run's checkpoints (best.pt, last.pt, ema.pt, snapshot-K.pt) and "
        "checkpoint files as weights only and never runs code found in them, so it refuses "
        "this file. A TorchScript file you exported yourself loads when you give its own path "
        "under another name (finetune export writes model.torchscript.pt); otherwise remove it."
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (file or run directory) as weights and plain values only: never
    unpickling arbitrary objects, never loading a TorchScript program (refused by content, before
    torch sees it, whatever the file's name)."""
    file = find_checkpoint(path)
    if is_torchscript_archive(file):
        raise not_weights(file)
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
