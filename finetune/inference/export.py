"""Trained run -> a file others can deploy: a safetensors bundle, TorchScript or ONNX.

A bundle is a directory with ``model.safetensors`` (the weights, no pickle) and ``model.json``
(everything needed to rebuild and use them: the timm model name and arguments, the stages kept
by stage-probe, the class names, the preprocessing contract, the strategy, the metrics and the
package versions). :func:`read_bundle` turns it back into the same description a checkpoint
holds, so ``finetune.load`` and ``finetune predict`` treat both alike.

A TorchScript export is the traced model (any batch size) with the same description stored
inside the archive as ``extra/finetune.json``; plain ``torch.jit.load`` runs it. An ONNX export
(torch's dynamo exporter, opset 18, dynamic batch size, checked with ``onnx.checker``) stores it
in the model's metadata under ``finetune``; :class:`OnnxModule` runs it with onnxruntime.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune import __version__
from finetune.errors import CheckpointError, NotAvailableError
from finetune.files import atomic_write, atomic_write_folder
from finetune.inference.formats import (
    META_FILE,
    WEIGHTS_FILE,
    Format,
    is_bundle,
    is_onnx,
    is_torchscript,
    read_checkpoint,
    sniff_format,
)
from finetune.run.checkpoint import find_checkpoint, rebuild_model
from finetune.run.layout import RunDir

__all__ = [
    "BUNDLE_FORMAT",
    "FORMATS",
    "OnnxModule",
    "export",
    "read_bundle",
    "read_onnx",
    "read_torchscript",
]

BUNDLE_FORMAT = 1
TORCHSCRIPT_META = "finetune.json"  # stored in the TorchScript archive's extra/ folder
ONNX_META = "finetune"  # metadata_props key holding the description
ONNX_OPSET = 18  # ONNX Runtime >= 1.14, TensorRT 8.6+, OpenVINO 2023+ all run it
FORMATS = ("safetensors", "torchscript", "onnx")


def _versions() -> dict[str, str]:
    found = {"finetune": __version__}
    for package in ("torch", "timm", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def export(
    model: str | Path,
    format: str = "safetensors",
    out: str | Path | None = None,
    head: nn.Module | None = None,
    *,
    force: bool = False,
) -> Path:
    """Export a run directory or checkpoint.

    Args:
        model: A run directory (its ``best.pt``) or a ``.pt`` checkpoint.
        format: ``safetensors`` (a bundle directory), ``torchscript`` or ``onnx`` (one file).
        out: Where to write, exactly as given: no suffix is added, and none is needed, since
            ``finetune.load`` and ``finetune predict`` tell the format from the content
            (``-o mymodel`` loads as ``mymodel``). Default ``<run dir>/bundle``,
            ``<run dir>/model.torchscript.pt`` or ``<run dir>/model.onnx``. An earlier export of
            the same kind there is replaced (a bundle: its own two files alone); anything else
            there makes the export refuse, unless ``force``.
        head: TorchScript and ONNX: the custom head the model was trained with, if any.
        force: Write anyway where ``out`` holds something else: a bundle's two files go into
            a folder that holds other files too (those are kept, never removed), a TorchScript
            or ONNX file replaces a file that is not such an export. A checkpoint, a run folder
            or a folder in place of a file is refused even so.

    Returns:
        The bundle directory or the exported file.

    Raises:
        CheckpointError: ``out`` holds something export must not replace (the message names
            it and what to do), or cannot be written.
    """
    if format not in FORMATS:
        raise NotAvailableError(f"Unknown format {format!r}; choose one of: {', '.join(FORMATS)}.")
    source = find_checkpoint(model)
    checkpoint = read_checkpoint(source)  # weights only: a TorchScript file here is refused
    try:
        if format == "torchscript":
            return _export_torchscript(checkpoint, source, out, head, force)
        if format == "onnx":
            return _export_onnx(checkpoint, source, out, head, force)
        return _export_bundle(checkpoint, source, out, force)
    except OSError as exc:  # a parent that is a file, no permission, a full disk...
        where = exc.filename or out or source.parent
        raise CheckpointError(
            f"Cannot write the export to {where}: {exc.strerror or exc}; choose another -o PATH."
        ) from exc


_FORCE = "pass --force (force=True) to replace it, or choose another -o PATH"


def _check_parents(target: Path) -> None:
    """Refuse a target below a file, which no folder can be created for."""
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(
                    f"-o {target} lies below {parent}, which is a file; choose another -o PATH."
                )
            return


def _file_target(
    out: str | Path | None, default: Path, is_ours: Callable[[Path], bool], kind: str, force: bool
) -> Path:
    """Where a one-file export goes: ``out`` or ``default``. What is there already is replaced
    only when it is an earlier export of ``kind`` (``is_ours``) or when ``force`` says so; a
    checkpoint, a bundle, a run or any folder never is."""
    target = Path(out).expanduser() if out else default
    _check_parents(target)
    if not (target.exists() or target.is_symlink()):
        return target
    if target.is_dir():
        raise CheckpointError(
            f"{target} is a folder; a {kind} is one file: give a file name with -o PATH."
        )
    found = sniff_format(target)
    if found in (Format.CHECKPOINT, Format.BUNDLE):
        raise CheckpointError(
            f"{target} is a finetune checkpoint, not a {kind}; an export never overwrites one: "
            "choose another -o PATH."
        )
    if not (force or is_ours(target)):
        raise CheckpointError(
            f"{target} exists and is not a {kind} of finetune's (an earlier export of this kind "
            f"is replaced, anything else is kept); {_FORCE}."
        )
    return target


def _bundle_target(out: str | Path | None, default: Path, force: bool) -> Path:
    """Where a bundle goes: ``out`` or ``default``, a folder that is new, empty or holds no
    more than a bundle's two files, which alone are replaced (``force``: whatever else it
    holds, kept as it is). Never a file, a run folder or a folder in place of a bundle file."""
    target = Path(out).expanduser() if out else default
    _check_parents(target)
    if not (target.exists() or target.is_symlink()):
        return target
    if not target.is_dir():
        raise CheckpointError(
            f"{target} is a file; a bundle is a folder ({META_FILE} + {WEIGHTS_FILE}): "
            "give a folder with -o PATH."
        )
    own = (META_FILE, WEIGHTS_FILE)
    entries = sorted(p.name for p in target.iterdir())
    others = [name for name in entries if name not in own]
    for name in own:
        if name in entries and not (target / name).is_file():
            raise CheckpointError(
                f"{target / name} is not a file, so the bundle cannot be written there; "
                "choose another -o PATH."
            )
    if RunDir(target).is_run():
        raise CheckpointError(
            f"{target} is a run folder; a bundle goes into a folder of its own (the default is "
            f"{RunDir(target).bundle}): choose another -o PATH."
        )
    if others and not force:
        what = (
            "a finetune bundle that also holds"
            if is_bundle(target)
            else "not a finetune bundle; it holds"
        )
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise CheckpointError(
            f"{target} is {what} {listed}. Export writes only {META_FILE} and {WEIGHTS_FILE} "
            "and never removes anything: pass --force (force=True) to write those two into it "
            "(the other files are kept), or choose another -o PATH (a new or empty folder)."
        )
    return target


def _export_bundle(
    checkpoint: dict[str, Any], source: Path, out: str | Path | None, force: bool
) -> Path:
    from safetensors.torch import save_file

    target = _bundle_target(out, RunDir(source.parent).bundle, force)
    meta = _describe(checkpoint, source)
    state = {k: v.detach().contiguous() for k, v in checkpoint["state_dict"].items()}

    def fill(folder: Path) -> None:
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "finetune-bundle"})
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    # A new folder appears whole; an existing one gets its two files replaced, nothing else.
    return atomic_write_folder(target, fill)


def _describe(checkpoint: dict[str, Any], source: Path) -> dict[str, Any]:
    """Everything but the weights: what a bundle's model.json, a TorchScript file's extra/
    and an ONNX file's metadata hold."""
    return {
        "format": "finetune-bundle",
        "format_version": BUNDLE_FORMAT,
        "model": checkpoint["model"],  # timm name, num_features, head, stage kept
        "timm_args": {"pretrained": False, "num_classes": 0},
        "classes": list(checkpoint["classes"]),
        "preprocessing": checkpoint["preprocessing"],
        "strategy": checkpoint.get("strategy"),
        "epoch": checkpoint.get("epoch"),
        "metrics": checkpoint.get("metrics"),
        "tta": checkpoint.get("tta"),  # the test-time augmentation chosen on val (tta.py)
        "source": str(source),
        "versions": _versions(),
    }


def _export_torchscript(
    checkpoint: dict[str, Any],
    source: Path,
    out: str | Path | None,
    head: nn.Module | None,
    force: bool,
) -> Path:
    default = RunDir(source.parent).torchscript
    target = _file_target(out, default, _is_our_torchscript, "TorchScript export", force)
    model = rebuild_model(checkpoint, head)
    side = checkpoint["preprocessing"]["input_size"]
    example = torch.zeros(2, 3, side, side)
    meta = json.dumps(_describe(checkpoint, source), indent=2)
    # no_grad, not inference_mode: tensors the forward creates become constants of the trace,
    # and made under inference_mode they are inference tensors: the saved module then fails
    # wherever autograd is on ("Inference tensors cannot be saved for backward").
    with warnings.catch_warnings(), torch.no_grad():
        # torch marks TorchScript deprecated in favour of torch.export, but it is still what
        # runs with plain torch.jit.load, in C++ (libtorch) and on mobile.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        extra = {TORCHSCRIPT_META: meta}
        return atomic_write(target, lambda f: torch.jit.save(traced, f, _extra_files=extra))


def _is_our_torchscript(path: Path) -> bool:
    """A TorchScript archive holding finetune's description: read from the zip's directory,
    nothing loaded or run."""
    if not is_torchscript(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"/extra/{TORCHSCRIPT_META}") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _is_our_onnx(path: Path) -> bool:
    """An ONNX model holding finetune's description in its metadata (parsed, never run)."""
    if not is_onnx(path):
        return False
    onnx, _ = _onnx_modules()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # onnx raises protobuf's own errors for a damaged file
        return False
    return any(prop.key == ONNX_META for prop in proto.metadata_props)


def read_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The TorchScript module and the description stored with it (empty if it has none)."""
    extra = {TORCHSCRIPT_META: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as exc:
        raise CheckpointError(f"Cannot load the TorchScript file {path}: {exc}") from exc
    if not extra[TORCHSCRIPT_META]:
        raise CheckpointError(
            f"{path} is a TorchScript file without finetune's description (classes and "
            "preprocessing); export it with `finetune export RUN --format torchscript`."
        )
    return module, json.loads(extra[TORCHSCRIPT_META])


def _onnx_modules():  # -> (onnx, onnxruntime)
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as exc:
        raise NotAvailableError(
            f"ONNX needs packages that are not installed ({exc.name}): "
            'pip install "finetune[onnx]" (onnx, onnxruntime, onnxscript).'
        ) from exc
    return onnx, onnxruntime


def _export_onnx(
    checkpoint: dict[str, Any],
    source: Path,
    out: str | Path | None,
    head: nn.Module | None,
    force: bool,
) -> Path:
    onnx, _ = _onnx_modules()
    target = _file_target(out, RunDir(source.parent).onnx, _is_our_onnx, "ONNX export", force)
    model = rebuild_model(checkpoint, head)
    side = checkpoint["preprocessing"]["input_size"]
    example = (torch.zeros(2, 3, side, side),)
    # no_grad, as torch.export's own examples use: the exporter traces the forward once,
    # so inference_mode would gain nothing, and tracing is where it is least safe (above).
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter is chatty about its internals
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            verbose=False,
        )
    proto = program.model_proto
    onnx.helper.set_model_props(
        proto, {ONNX_META: json.dumps(_describe(checkpoint, source), indent=2)}
    )
    onnx.checker.check_model(proto, full_check=True)
    # The serialized proto, as onnx.save writes it: onnx.save itself wants the file's name,
    # which the temporary file of atomic_write (opened from a descriptor) does not have.
    return atomic_write(target, proto.SerializeToString())


class OnnxModule(nn.Module):
    """An ONNX export run by onnxruntime behind the ``nn.Module`` interface (tensor in, logits
    out), so a :class:`~finetune.inference.predict.Predictor` treats it like the eager model."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        _, onnxruntime = _onnx_modules()
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in onnxruntime.get_available_providers()
        ]
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CheckpointError(f"Cannot load the ONNX file {path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().numpy()
        logits = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(logits).to(x.device)


def read_onnx(path: str | Path) -> tuple[OnnxModule, dict[str, Any]]:
    """The ONNX model, ready to run, and the description stored in its metadata."""
    module = OnnxModule(path)
    props = module.session.get_modelmeta().custom_metadata_map
    if ONNX_META not in props:
        raise CheckpointError(
            f"{path} is an ONNX file without finetune's description (classes and "
            "preprocessing); export it with `finetune export RUN --format onnx`."
        )
    return module, json.loads(props[ONNX_META])


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
