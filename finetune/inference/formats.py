"""Model path -> what it holds, read from its content, never from its name's suffix.

``finetune export -o mymodel`` writes whatever name it is given, so ``finetune.load``,
``predict`` and ``evaluate`` look inside: a folder with ``model.json`` and ``model.safetensors``
is a bundle, a folder holding ``best.pt`` or ``last.pt`` a run; a file that is a zip archive is a
torch checkpoint when it holds ``data.pkl`` only and TorchScript when it also holds
``constants.pkl`` or ``code/`` (torch's own test, ``torch.serialization._is_torchscript_zip``); a
file that parses as an ONNX ``ModelProto`` is ONNX. Every reader asks :func:`detect_format`.

Safety: TorchScript is a program, and loading and running it runs its code. A checkpoint is
only ever read as weights (``torch.load(weights_only=True)``: :func:`read_checkpoint`), so the
checkpoints of a run folder (``best.pt``, ``last.pt``, ``ema.pt``, ``snapshot-K.pt``) are never
run, whatever their content: a TorchScript archive under one of those names is refused, even
when its path is given directly. TorchScript runs only from a file named directly as the model
whose name is not a run checkpoint's (``finetune export`` writes ``model.torchscript.pt``).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, BinaryIO

from finetune.errors import CheckpointError
from finetune.run.checkpoint import load_checkpoint, not_weights, torch_archive_kind
from finetune.run.layout import RunDir

__all__ = [
    "META_FILE",
    "WEIGHTS_FILE",
    "Format",
    "detect_format",
    "is_bundle",
    "is_onnx",
    "is_torchscript",
    "read_checkpoint",
    "sniff_format",
]

WEIGHTS_FILE = "model.safetensors"  # a bundle's weights
META_FILE = "model.json"  # a bundle's description


class Format(enum.Enum):
    """The kinds of model path finetune reads."""

    RUN = "run"  # a run folder written by fit: its checkpoints are read as weights only
    CHECKPOINT = "checkpoint"  # one checkpoint file (torch.save of plain values and tensors)
    BUNDLE = "bundle"  # finetune export's safetensors folder (or its model.safetensors)
    TORCHSCRIPT = "torchscript"  # finetune export --format torchscript: a TorchScript archive
    ONNX = "onnx"  # finetune export --format onnx: an ONNX model


_KINDS = {
    Format.RUN: "a run folder written by `finetune fit` (it holds best.pt or last.pt)",
    Format.CHECKPOINT: "a checkpoint file written by `finetune fit` (best.pt, last.pt...)",
    Format.BUNDLE: f"a bundle folder from `finetune export` ({META_FILE} + {WEIGHTS_FILE}), "
    f"or its {WEIGHTS_FILE}",
    Format.TORCHSCRIPT: "a TorchScript file from `finetune export --format torchscript`",
    Format.ONNX: "an ONNX file from `finetune export --format onnx`",
}

_ZIP_MAGIC = b"PK\x03\x04"  # what torch.save and torch.jit.save files start with
# ModelProto (onnx.proto): field number -> protobuf wire type (0 varint, 2 length-delimited).
# ir_version 1, producer_name 2, producer_version 3, domain 4, model_version 5, doc_string 6,
# graph 7, opset_import 8, metadata_props 14, training_info 20, functions 25, configuration 26.
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_ONNX_MAX_FIELDS = 100_000  # a model has a handful of top-level fields; give up on more


def sniff_format(path: str | Path) -> Format | None:
    """What ``path`` holds, judged by its content; None for anything else (an image, a folder
    of images, a missing path). Reads a few bytes, the zip directory or the top level of a
    protobuf, never the whole file."""
    path = Path(path).expanduser()
    if path.is_dir():
        if _is_bundle_folder(path):
            return Format.BUNDLE
        return Format.RUN if RunDir(path).is_run() else None
    if not path.is_file():
        return None
    if path.name == WEIGHTS_FILE and _is_bundle_folder(path.parent):
        return Format.BUNDLE
    try:
        with path.open("rb") as file:
            head = file.read(4)
            if head == _ZIP_MAGIC:
                return _torch_archive(path)
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                # a pickle: torch.save's legacy (non-zip) format; read as weights only
                return Format.CHECKPOINT
            file.seek(0)
            return Format.ONNX if _is_model_proto(file, path.stat().st_size) else None
    except OSError:
        return None


def detect_format(path: str | Path) -> Format:
    """What ``path`` holds and so how finetune reads it, judged by its content.

    Raises:
        CheckpointError: ``path`` does not exist, is none of the kinds finetune reads (the
            message lists them), or is a TorchScript archive named as a run's checkpoint
            (``best.pt``...), which finetune reads as weights only and never runs.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist. Give {_kinds()}.")
    found = sniff_format(path)
    if found is None:
        what = "folder" if path.is_dir() else "file"
        raise CheckpointError(
            f"{path} is not a model finetune reads: the {what} is none of {_kinds()}."
        )
    if found is Format.TORCHSCRIPT and _is_run_checkpoint(path):
        raise not_weights(path)
    return found


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint file ``path`` (or a run folder's ``best.pt``, ``last.pt`` if it has no
    best), read as weights and plain values only (``torch.load(weights_only=True)``), whatever
    its name or content.

    Raises:
        CheckpointError: The file is a TorchScript archive (a program, which a checkpoint must
            not be: it is refused, never run), or not a readable finetune checkpoint.
    """
    return load_checkpoint(path)  # finds the run's file; refuses TorchScript by content


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a bundle folder (or its ``model.safetensors``)."""
    return sniff_format(path) is Format.BUNDLE


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (rather than a checkpoint), by its content."""
    return sniff_format(path) is Format.TORCHSCRIPT


def is_onnx(path: str | Path) -> bool:
    """Whether ``path`` is an ONNX model, by its content (any name, any suffix)."""
    return sniff_format(path) is Format.ONNX


def _kinds() -> str:
    return "; ".join(_KINDS.values())


def _is_bundle_folder(folder: Path) -> bool:
    return (folder / META_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _is_run_checkpoint(path: Path) -> bool:
    """Whether ``path`` carries the name of a run's checkpoint (best.pt, snapshot-3.pt...)."""
    run = RunDir(path.parent)
    named = [run.best, run.last, run.ema, *run.snapshots()]
    return any(path.name == p.name for p in named)


def _torch_archive(path: Path) -> Format | None:
    """A zip archive as torch writes it: TorchScript or a checkpoint, by the records it holds."""
    kind = torch_archive_kind(path)
    return None if kind is None else Format(kind)


def _is_model_proto(file: BinaryIO, size: int) -> bool:
    """Whether the file's top level parses as an ONNX ``ModelProto``: only its known fields,
    each of the right wire type, length-delimited ones inside the file, ending exactly at its
    end, with an ir_version and a graph. Skips over the fields, so a big model costs a few
    reads; the first byte of an image or a text file already fails."""
    seen: set[int] = set()
    for _ in range(_ONNX_MAX_FIELDS):
        if file.tell() == size:
            return {1, 7} <= seen
        tag = _varint(file)
        if tag is None or _ONNX_FIELDS.get(tag >> 3) != tag & 7:
            return False
        value = _varint(file)
        if value is None:
            return False
        if tag & 7 == 2:
            if file.tell() + value > size:
                return False
            file.seek(value, 1)
        seen.add(tag >> 3)
    return False


def _varint(file: BinaryIO) -> int | None:
    """A protobuf base-128 varint, or None at the end of the file or past 10 bytes."""
    value = 0
    for shift in range(0, 70, 7):
        byte = file.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    return None
