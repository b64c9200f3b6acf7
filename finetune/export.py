"""Trained run -> a file others can deploy: the safetensors bundle.

A bundle is a directory with ``model.safetensors`` (the weights, no pickle) and ``model.json``
(everything needed to rebuild and use them: the timm model name and arguments, the stages kept
by stage-probe, the class names, the preprocessing contract, the strategy, the metrics and the
package versions). :func:`read_bundle` turns it back into the same description a checkpoint
holds, so ``finetune.load`` and ``finetune predict`` treat both alike.

TorchScript and ONNX exports are not built yet.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from finetune import __version__
from finetune.checkpoint import find_checkpoint, load_checkpoint
from finetune.errors import CheckpointError, NotAvailableError

__all__ = ["BUNDLE_FORMAT", "FORMATS", "export", "is_bundle", "read_bundle"]

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMATS = ("safetensors",)
_PLANNED = ("torchscript", "onnx")


def _versions() -> dict[str, str]:
    found = {"finetune": __version__}
    for package in ("torch", "timm", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def export(model: str | Path, format: str = "safetensors", out: str | Path | None = None) -> Path:
    """Export a run directory or checkpoint.

    Args:
        model: A run directory (its ``best.pt``) or a ``.pt`` checkpoint.
        format: ``safetensors`` (a bundle directory).
        out: Where to write; default ``<run dir>/bundle``. An existing bundle there is replaced;
            anything else there is left alone and the export refuses.

    Returns:
        The bundle directory.
    """
    if format in _PLANNED:
        raise NotAvailableError(
            f"--format {format} is not available yet; --format safetensors writes a bundle that "
            "finetune.load and finetune predict read."
        )
    if format not in FORMATS:
        raise NotAvailableError(f"Unknown format {format!r}; choose one of: {', '.join(FORMATS)}.")
    from safetensors.torch import save_file

    source = find_checkpoint(model)
    checkpoint = load_checkpoint(source)
    target = Path(out).expanduser() if out else source.parent / "bundle"
    if target.exists() and not is_bundle(target):
        raise CheckpointError(
            f"{target} exists and is not a finetune bundle; choose another -o PATH or remove it."
        )
    meta = {
        "format": "finetune-bundle",
        "format_version": BUNDLE_FORMAT,
        "model": checkpoint["model"],  # timm name, num_features, head, stage kept
        "timm_args": {"pretrained": False, "num_classes": 0},
        "classes": list(checkpoint["classes"]),
        "preprocessing": checkpoint["preprocessing"],
        "strategy": checkpoint.get("strategy"),
        "epoch": checkpoint.get("epoch"),
        "metrics": checkpoint.get("metrics"),
        "source": str(source),
        "versions": _versions(),
    }
    state = {k: v.detach().contiguous() for k, v in checkpoint["state_dict"].items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "finetune-bundle"})
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _readable(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _readable(folder: Path) -> None:
    """Give the staged bundle the permissions a plain mkdir/open would (temp files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a bundle directory (or its ``model.safetensors``)."""
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS_FILE else path
    return (folder / META_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read_bundle(path: str | Path) -> dict[str, Any]:
    """A bundle as a checkpoint-shaped description (model, classes, preprocessing, state_dict),
    read with JSON and safetensors only: no unpickling at all."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    folder = path.parent if path.name == WEIGHTS_FILE else path
    try:
        meta = json.loads((folder / META_FILE).read_text())
        state = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"Cannot read the bundle {folder}: {exc}") from exc
    if meta.get("format") != "finetune-bundle":
        raise CheckpointError(f"{folder / META_FILE} does not describe a finetune bundle.")
    if meta.get("format_version", 0) > BUNDLE_FORMAT:
        raise CheckpointError(
            f"{folder} was written by a newer finetune (bundle format {meta['format_version']}); "
            "upgrade finetune to read it."
        )
    return {**meta, "state_dict": state}
