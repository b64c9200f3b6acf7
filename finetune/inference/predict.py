"""Checkpoint -> predictions: ``finetune.load(path)`` and the :class:`Predictor` it returns.

:class:`Predictor` runs one model; :class:`Ensemble` averages the softmax of several (a snapshot
ensemble of a run, or models of several runs, each with its own preprocessing). Both decode each
image once and then classify batches of decoded arrays (:meth:`BasePredictor.batch_proba`), so
an ensemble member only builds its own input tensors from the arrays.

An input that is not a usable image (unreadable, truncated, empty, not an image whatever its
name, a decompression bomb, a folder or a FIFO named ``x.png``) is skipped with the reason, and
the others are classified: each skip is reported as a :class:`Skipped` to the caller's
``on_skip`` (by default, as a warning; see :mod:`finetune.inference.inputs`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from finetune.config import TTA_MODES
from finetune.data.scan import iter_image_files
from finetune.data.transforms import Preprocessing, TestTimeViews
from finetune.errors import CheckpointError, ConfigError, DataError
from finetune.inference.export import read_bundle, read_onnx, read_torchscript
from finetune.inference.formats import Format, detect_format, read_checkpoint, sniff_format
from finetune.inference.inputs import (
    ImageInput,
    OnSkip,
    Skipped,
    UnreadableImage,
    read_image,
    report_skip,
)
from finetune.inference.tta import TTAChoice
from finetune.model.backbone import Classifier
from finetune.run.checkpoint import CHECKPOINTS, preprocessing_of, rebuild_model, run_checkpoints
from finetune.training.compute import resolve_channels_last

if TYPE_CHECKING:
    from finetune.inference.evaluate import Evaluation

__all__ = [
    "BasePredictor",
    "Ensemble",
    "ImageInput",
    "OnSkip",
    "Prediction",
    "Predictor",
    "Skipped",
    "UnreadableImage",
    "expand_inputs",
    "is_model_path",
    "leading_models",
    "load",
    "load_ensemble",
    "read_image",
]

_MODEL_SUFFIXES = (".pt", ".pth", ".onnx")  # names that claim a model (see is_model_path)


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image."""

    path: str | None  # the file, when the input was one
    label: str  # most probable class
    probability: float  # its softmax probability
    top_k: tuple[tuple[str, float], ...]  # (class, probability), most probable first

    def to_dict(self) -> dict[str, Any]:
        """The JSON form printed by ``finetune predict --json``."""
        return {
            "path": self.path,
            "label": self.label,
            "probability": self.probability,
            "top_k": [{"label": c, "probability": p} for c, p in self.top_k],
        }


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded recursively to their image files (sorted).

    Any other entry that exists (a FIFO, a device) is kept: reading it is refused with the
    reason when its turn comes, as for any file that is not an image, and the others go on.

    Raises:
        DataError: An input does not exist (a typo: nothing is classified).
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            paths.extend(iter_image_files(path))
        elif path.exists():
            paths.append(path)
        else:
            raise DataError(f"{path} does not exist. Give image files or folders of images.")
    return paths


def is_model_path(path: str | Path) -> bool:
    """Whether ``path`` is something :func:`load` reads, rather than an image or image folder:
    by its content (:func:`~finetune.inference.formats.sniff_format`), a run directory, a
    checkpoint, a TorchScript or ONNX file of any name, or an exported bundle (its directory or
    ``model.safetensors``). A file whose suffix claims a model (``.pt``, ``.pth``, ``.onnx``)
    counts too, so that a damaged one is reported by :func:`load` rather than skipped as an
    undecodable image."""
    path = Path(path).expanduser()
    if sniff_format(path) is not None:
        return True
    return path.is_file() and path.suffix.lower() in _MODEL_SUFFIXES


def leading_models(args: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """Split command-line arguments into the leading ones that are models
    (:func:`is_model_path`) and the rest, as ``finetune predict --ensemble`` reads them.

    Raises:
        DataError: A model comes after an image or folder (it would be read as images).
    """
    paths = [Path(a) for a in args]
    count = next((i for i, p in enumerate(paths) if not is_model_path(p)), len(paths))
    late = next((p for p in paths[count:] if is_model_path(p)), None)
    if late is not None:
        raise DataError(
            f"{late} is a model but comes after the image argument {paths[count]}; give all the "
            "models first, then the images or folders."
        )
    return paths[:count], paths[count:]


class BasePredictor:
    """What :class:`Predictor` (one model) and :class:`Ensemble` (several) share: images in,
    probabilities and :class:`Prediction` objects out. Subclasses set ``classes`` and implement
    :meth:`batch_proba`; this class decodes each image once and batches the arrays."""

    classes: tuple[str, ...]  # the columns of every probability array, in order
    checkpoint: str | None = None  # which checkpoint of a run was loaded; None: a model file

    def batch_proba(self, arrays: Sequence[np.ndarray], tta: str = "auto") -> np.ndarray:
        """Softmax probabilities of decoded images, shape (len(arrays), num_classes).

        Args:
            arrays: uint8 (H, W, 3) RGB images of any size; each model resizes and crops them
                to its own input.
            tta: "auto", "none", "flip" or "10crop" (see :meth:`iter_proba`).
        """
        raise NotImplementedError

    def views_proba(self, arrays: Sequence[np.ndarray], tta: str) -> np.ndarray:
        """Softmax probabilities of each test-time view, shape (len(arrays), views,
        num_classes), views in :meth:`TestTimeViews.crops`'s order; ``tta`` is "none", "flip"
        or "10crop" (:mod:`finetune.inference.tta` scores the modes from the ten views)."""
        raise NotImplementedError

    def resolve_tta(self, tta: str) -> str:
        """The test-time augmentation ``tta`` stands for: itself, or for "auto" the mode
        chosen on val when the model was fit ("none" for a model without that record); "auto"
        still for an ensemble whose members chose differently.

        Raises:
            ConfigError: ``tta`` is not "auto", "none", "flip" or "10crop".
        """
        raise NotImplementedError

    def tta_warnings(self, tta: str) -> list[str]:
        """Why an explicit ``tta`` is a poor choice for the model(s): it scored below the mode
        chosen on val when they were fit (empty: it did not, or nothing was recorded)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The model file(s) behind the predictions, as recorded in ``evaluation.json``."""
        raise NotImplementedError

    def predict_proba(
        self,
        images: Iterable[ImageInput],
        batch_size: int = 32,
        tta: str = "auto",
        on_skip: OnSkip | None = None,
    ) -> np.ndarray:
        """Softmax probabilities, shape (N, num_classes), in ``self.classes`` order: row i is
        input i's. An input that is not a usable image gets a row of NaN, so the rows stay
        aligned with the inputs, and is reported as in :meth:`iter_proba`."""
        skipped: list[int] = []

        def note(skip: Skipped) -> None:
            skipped.append(skip.index)
            report_skip(skip, on_skip)

        rows = [p for _, p in self.iter_proba(images, batch_size, tta, on_skip=note)]
        probs = np.full((len(rows) + len(skipped), len(self.classes)), np.nan, dtype=np.float32)
        read = np.ones(len(probs), dtype=bool)
        read[skipped] = False
        if rows:
            probs[read] = np.stack(rows)
        return probs

    def iter_proba(
        self,
        images: Iterable[ImageInput],
        batch_size: int = 32,
        tta: str = "auto",
        on_skip: OnSkip | None = None,
    ) -> Iterator[tuple[ImageInput, np.ndarray]]:
        """Yield (input, softmax probabilities) as batches complete. An input that is not a
        usable image (:class:`UnreadableImage`) is left out, and the others go on.

        Args:
            tta: Test-time augmentation: "none" (the centre crop), "flip" (and its mirror
                image) or "10crop" (four corners and centre, each also mirrored); the softmax
                is averaged over the views (and, in an ensemble, over the models: each applies
                ``tta`` to its own input). ``batch_size`` counts images, not views. "auto":
                the mode ``fit`` found best on the validation images, as the model records it
                (:mod:`finetune.inference.tta`; "none" for a model without the record). An
                explicit mode that scored below the recorded choice gets a warning with the
                numbers.
            on_skip: Called with a :class:`Skipped` for each input left out [default: a
                warning per input].
        """
        self.resolve_tta(tta)  # an unknown mode refused before any image is read
        for message in self.tta_warnings(tta):
            warnings.warn(message, stacklevel=3)
        sources: list[ImageInput] = []
        arrays: list[np.ndarray] = []

        def flush() -> Iterator[tuple[ImageInput, np.ndarray]]:
            yield from zip(sources, self.batch_proba(arrays, tta), strict=True)
            sources.clear()
            arrays.clear()

        for index, image in enumerate(images):
            try:
                array = read_image(image)
            except UnreadableImage as exc:
                report_skip(Skipped(exc.path, exc.reason, index), on_skip)
                continue
            sources.append(image)
            arrays.append(array)
            if len(arrays) == batch_size:
                yield from flush()
        if arrays:
            yield from flush()

    def iter_predict(
        self,
        images: Iterable[ImageInput],
        top_k: int = 5,
        batch_size: int = 32,
        tta: str = "auto",
        on_skip: OnSkip | None = None,
    ) -> Iterator[Prediction]:
        """Yield a :class:`Prediction` per image as batches complete (streams large folders);
        an input that is not a usable image is reported to ``on_skip`` (see
        :meth:`iter_proba`) and the others go on."""
        k = max(1, min(top_k, len(self.classes)))
        with torch.inference_mode():
            for source, probs in self.iter_proba(images, batch_size, tta, on_skip):
                order = np.argsort(-probs, kind="stable")[:k]
                ranked = tuple((self.classes[i], float(probs[i])) for i in order)
                path = str(source) if isinstance(source, (str, Path)) else None
                yield Prediction(path, ranked[0][0], ranked[0][1], ranked)

    def predict(
        self,
        images: Iterable[ImageInput] | ImageInput,
        top_k: int = 5,
        batch_size: int = 32,
        tta: str = "auto",
        on_skip: OnSkip | None = None,
    ) -> list[Prediction]:
        """Classify images: paths, PIL images or uint8 RGB arrays (one, or an iterable of them).

        ``tta``: "auto", "none", "flip" or "10crop"; ``on_skip``: what is told of an input that
        is not a usable image, which is left out (see :meth:`iter_proba`)."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        return list(
            self.iter_predict(images, top_k=top_k, batch_size=batch_size, tta=tta, on_skip=on_skip)
        )

    def evaluate(
        self,
        folder: str | Path,
        top_k: int = 5,
        batch_size: int = 32,
        tta: str = "auto",
        on_skip: OnSkip | None = None,
    ) -> Evaluation:
        """Accuracy, per-class metrics, confusion matrix and mistakes on a labelled folder (one
        sub-folder per class); see :func:`finetune.inference.evaluate.evaluate`."""
        from finetune.inference.evaluate import evaluate

        return evaluate(self, folder, top_k, batch_size, tta, on_skip)


class Predictor(BasePredictor):
    """A trained model with its classes and preprocessing, ready to classify images."""

    def __init__(
        self,
        model: Classifier,
        classes: Iterable[str],
        preprocessing: Preprocessing,
        device: str | torch.device | None = None,
        source: str | Path | None = None,
        checkpoint: str | None = None,
        channels_last: bool | None = None,
        tta: TTAChoice | None = None,
    ) -> None:
        """
        Args:
            model: Images (N, 3, H, W) -> logits (N, num_classes): the rebuilt classifier, or
                a TorchScript/ONNX module.
            classes: The class names, in the order of the logits.
            preprocessing: How the model's inputs are made from images.
            device: Where to run; default cuda when available.
            source: The file the model was read from, if any (for reports).
            checkpoint: Which checkpoint of a run directory it is ("best", "ema", ...), if any.
            channels_last: Run a rebuilt classifier and its inputs in NHWC layout [default: on
                CPUs and CUDA, as fit trains; ``benchmarks/predict.py`` measures it]. Exported
                modules keep the layout they were exported in.
            tta: The test-time augmentation chosen on val when the model was fit (what
                ``tta="auto"`` uses; None: "none").
        """
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.channels_last = isinstance(model, Classifier) and resolve_channels_last(
            channels_last, self.device
        )
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.classes = tuple(classes)
        self.preprocessing = preprocessing
        self.source = None if source is None else str(source)
        self.checkpoint = checkpoint
        self.tta = tta
        self._views: dict[str, TestTimeViews] = {}

    def views(self, tta: str = "auto") -> TestTimeViews:
        """The test-time views for ``tta`` ("none": the evaluation centre crop, "flip",
        "10crop")."""
        if tta not in self._views:
            self._views[tta] = TestTimeViews(self.preprocessing, tta)
        return self._views[tta]

    def resolve_tta(self, tta: str) -> str:
        if tta == "auto":
            return "none" if self.tta is None else self.tta.chosen
        if tta not in TTA_MODES:
            modes = ", ".join(TTA_MODES)
            raise ConfigError(f"Unknown TTA mode {tta!r}; choose auto or one of {modes}.")
        return tta

    def tta_warnings(self, tta: str) -> list[str]:
        if tta == "auto" or self.tta is None or tta == self.tta.chosen:
            return []
        why = self.tta.hurts(tta)
        return [] if why is None else [f"{_name(self)}: {why}."]

    def views_proba(self, arrays: Sequence[np.ndarray], tta: str) -> np.ndarray:
        views = self.views(self.resolve_tta(tta))
        x = torch.cat([views(a) for a in arrays]).to(self.device)  # (images * views, 3, H, W)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = self.model(x).float().softmax(1)
        return probs.view(len(arrays), views.count, -1).cpu().numpy()

    def batch_proba(self, arrays: Sequence[np.ndarray], tta: str = "auto") -> np.ndarray:
        return self.views_proba(arrays, tta).mean(1)

    def describe(self) -> dict[str, Any]:
        return {"file": self.source, "checkpoint": self.checkpoint}


class Ensemble(BasePredictor):
    """Several models whose softmax probabilities are averaged (equal weights).

    Members may differ in architecture and preprocessing (input size, mean/std); each image is
    decoded once and every member makes its own input from it. The members must know the same
    classes; the ensemble uses the first member's order and reorders the others' columns by
    class name. A member may itself be an ensemble (a run's snapshots), which then counts as
    one model.
    """

    def __init__(
        self,
        members: Sequence[BasePredictor],
        source: str | Path | None = None,
        checkpoint: str | None = None,
    ) -> None:
        """
        Args:
            members: The predictors to average.
            source: What the ensemble was loaded from as a whole (a run's snapshots), if any.
            checkpoint: Which checkpoint of each run directory the members are, if it applies.

        Raises:
            CheckpointError: No members, or members whose classes differ (the message names both
                models and the classes only one of them has).
        """
        if not members:
            raise CheckpointError("An ensemble needs at least one model; none were given.")
        self.members = tuple(members)
        self.classes = tuple(members[0].classes)
        self.source = None if source is None else str(source)
        self.checkpoint = checkpoint
        first = set(self.classes)
        for member in self.members[1:]:
            if set(member.classes) != first or len(member.classes) != len(self.classes):
                raise CheckpointError(
                    f"The models of an ensemble must know the same classes: "
                    f"{_name(self.members[0])} and {_name(member)} differ ("
                    f"{_difference(self.classes, member.classes)}). Ensemble models trained on "
                    "the same class folders."
                )
        # member column j -> ensemble column: pick the member's columns in the ensemble's order
        self._columns = [[m.classes.index(c) for c in self.classes] for m in self.members]

    def resolve_tta(self, tta: str) -> str:
        modes = {member.resolve_tta(tta) for member in self.members}
        return modes.pop() if len(modes) == 1 else "auto"

    def tta_warnings(self, tta: str) -> list[str]:
        return [message for member in self.members for message in member.tta_warnings(tta)]

    def views_proba(self, arrays: Sequence[np.ndarray], tta: str) -> np.ndarray:
        if tta not in TTA_MODES:  # "auto" may mean a different number of views per member
            raise ConfigError(f"An ensemble's views need one TTA mode, not {tta!r}.")
        total = 0.0
        for member, columns in zip(self.members, self._columns, strict=True):
            total = total + member.views_proba(arrays, tta)[:, :, columns].astype(np.float64)
        return (total / len(self.members)).astype(np.float32)

    def batch_proba(self, arrays: Sequence[np.ndarray], tta: str = "auto") -> np.ndarray:
        total = np.zeros((len(arrays), len(self.classes)), dtype=np.float64)
        for member, columns in zip(self.members, self._columns, strict=True):
            total += member.batch_proba(arrays, tta)[:, columns]
        return (total / len(self.members)).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "ensemble": [m.describe() for m in self.members],
            "source": self.source,
            "checkpoint": self.checkpoint,
        }


def _name(predictor: BasePredictor) -> str:
    source = getattr(predictor, "source", None)
    return source if source is not None else f"a {type(predictor).__name__} in memory"


def _difference(a: Sequence[str], b: Sequence[str]) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    parts = [
        f"only the first has {', '.join(only_a)}" if only_a else "",
        f"only the second has {', '.join(only_b)}" if only_b else "",
    ]
    return "; ".join(p for p in parts if p) or "a class name appears twice"


def load(
    path: str | Path,
    head: nn.Module | None = None,
    device: str | torch.device | None = None,
    checkpoint: str = "best",
) -> Predictor | Ensemble:
    """Load a run directory, a checkpoint file, or a safetensors bundle, TorchScript file or
    ONNX file (from ``finetune export``) as a :class:`Predictor`.

    What ``path`` is comes from its content, not its suffix
    (:func:`~finetune.inference.formats.detect_format`): ``finetune export -o mymodel`` loads
    as ``mymodel``. A run directory's checkpoints are read as weights only, never run: a
    TorchScript archive in their place is refused, and TorchScript runs only from a file
    given here by its own path.

    Args:
        path: A run directory written by ``fit``, a checkpoint file, or a bundle directory
            (or its ``model.safetensors``), a TorchScript file or an ONNX file.
        head: An instance of the custom head the model was trained with, if any.
        device: Where to run; default cuda when available.
        checkpoint: For a run directory, which of its checkpoints: "best" (``best.pt``),
            "last", "ema" (``ema.pt``, from ``fit --ema``) or "snapshots" (every
            ``snapshot-K.pt``, from ``fit --schedule restarts``, as an :class:`Ensemble`).
            A model file is what it is: leave "best" for one.

    Raises:
        ConfigError: Unknown ``checkpoint``, or one other than "best" for a model file.
        CheckpointError: The run lacks that checkpoint (the message names the fit option that
            writes it), ``path`` is none of the kinds above (the message lists them), a
            checkpoint is a TorchScript archive, or the file cannot be read.

    Example:
        >>> predictor = finetune.load("runs/fashion", checkpoint="ema")
    """
    path = Path(path).expanduser()
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(
            f"Unknown checkpoint {checkpoint!r}; choose one of {', '.join(CHECKPOINTS)}."
        )
    found = detect_format(path)
    if found is Format.RUN:
        files = run_checkpoints(path, checkpoint)
        if checkpoint == "snapshots":
            members = [_load_checkpoint(f, _copy(head), device, checkpoint) for f in files]
            return Ensemble(members, source=path, checkpoint=checkpoint)
        return _load_checkpoint(files[0], head, device, checkpoint)
    if checkpoint != "best":
        raise ConfigError(
            f"checkpoint {checkpoint!r} picks a file of a run directory, but {path} is a model "
            "file already. Give the run directory, or leave the checkpoint at best."
        )
    if found is Format.CHECKPOINT:
        return _load_checkpoint(path, head, device, None)
    if found is Format.BUNDLE:
        state = read_bundle(path)
        model = rebuild_model(state, head)
        pre = preprocessing_of(state)
        tta = TTAChoice.from_dict(state.get("tta"), str(path))
        return Predictor(model, state["classes"], pre, device, source=path, tta=tta)
    # an export the user named: the only place a TorchScript program is loaded
    module, meta = read_torchscript(path) if found is Format.TORCHSCRIPT else read_onnx(path)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    tta = TTAChoice.from_dict(meta.get("tta"), str(path))
    return Predictor(module, meta["classes"], pre, device, source=path, tta=tta)


def load_ensemble(
    paths: Iterable[str | Path],
    head: nn.Module | None = None,
    device: str | torch.device | None = None,
    checkpoint: str = "best",
) -> Ensemble:
    """Load several models as one :class:`Ensemble` that averages their softmax.

    Args:
        paths: Anything :func:`load` takes: run directories (possibly trained with different
            models or image sizes), checkpoint files, exports.
        head: An instance of the custom head the models were trained with, if any (each model
            gets its own copy).
        device: Where to run; default cuda when available.
        checkpoint: Which checkpoint of each run directory (see :func:`load`); with
            "snapshots" each run's snapshot ensemble counts as one model, so every run weighs
            the same.

    Raises:
        CheckpointError: No paths, or models with different classes (named in the message).

    Example:
        >>> ensemble = finetune.load_ensemble(["runs/lite0-224", "runs/lite2-260"])
        >>> ensemble.predict("sample_data/fashion/test/bag/00018.png")[0].label
    """
    members = [load(p, _copy(head), device, checkpoint) for p in paths]
    if not members:
        raise CheckpointError("An ensemble needs at least one model; no paths were given.")
    return Ensemble(members, checkpoint=checkpoint)


def _copy(head: nn.Module | None) -> nn.Module | None:
    """A fresh copy of a custom head: every model of an ensemble loads its own weights into it."""
    return None if head is None else copy.deepcopy(head)


def _load_checkpoint(
    path: Path, head: nn.Module | None, device: str | torch.device | None, checkpoint: str | None
) -> Predictor:
    """A checkpoint file, read as weights only (a TorchScript archive there is refused)."""
    state = read_checkpoint(path)
    model = rebuild_model(state, head)
    pre = preprocessing_of(state)
    tta = TTAChoice.from_dict(state.get("tta"), str(path))
    return Predictor(
        model, state["classes"], pre, device, source=path, checkpoint=checkpoint, tta=tta
    )
