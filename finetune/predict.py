"""Checkpoint -> predictions: ``finetune.load(path)`` and the :class:`Predictor` it returns."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from finetune.checkpoint import load_checkpoint, preprocessing_of, rebuild_model
from finetune.data import iter_image_files, load_image, pil_to_rgb
from finetune.errors import DataError
from finetune.exports import (
    is_bundle,
    is_onnx,
    is_torchscript,
    read_bundle,
    read_onnx,
    read_torchscript,
)
from finetune.models import Classifier
from finetune.transforms import Preprocessing, TestTimeViews

if TYPE_CHECKING:
    from finetune.evaluate import Evaluation

__all__ = ["ImageInput", "Prediction", "Predictor", "expand_inputs", "load"]

ImageInput = str | Path | Image.Image | np.ndarray


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
    """Files as given, folders expanded recursively to their image files (sorted)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            paths.extend(iter_image_files(path))
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"{path} does not exist. Give image files or folders of images.")
    return paths


class Predictor:
    """A trained model with its classes and preprocessing, ready to classify images."""

    def __init__(
        self,
        model: Classifier,
        classes: Iterable[str],
        preprocessing: Preprocessing,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.classes = tuple(classes)
        self.preprocessing = preprocessing
        self._views: dict[str, TestTimeViews] = {}

    def views(self, tta: str = "none") -> TestTimeViews:
        """The test-time views for ``tta`` ("none": the evaluation centre crop, "flip",
        "10crop")."""
        if tta not in self._views:
            self._views[tta] = TestTimeViews(self.preprocessing, tta)
        return self._views[tta]

    def _decode(self, image: ImageInput) -> np.ndarray:
        if isinstance(image, Image.Image):
            return pil_to_rgb(image)
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise DataError(
                    f"An array image must be uint8 (H, W, 3) RGB or (H, W) grey; got "
                    f"{image.dtype} {image.shape}."
                )
            return image
        return load_image(image)

    def predict_proba(
        self, images: Iterable[ImageInput], batch_size: int = 32, tta: str = "none"
    ) -> np.ndarray:
        """Softmax probabilities, shape (N, num_classes), in ``self.classes`` order."""
        rows = [p for _, p in self.iter_proba(images, batch_size, tta)]
        return np.stack(rows) if rows else np.zeros((0, len(self.classes)), dtype=np.float32)

    def iter_proba(
        self, images: Iterable[ImageInput], batch_size: int = 32, tta: str = "none"
    ) -> Iterator[tuple[ImageInput, np.ndarray]]:
        """Yield (input, softmax probabilities) as batches complete; undecodable inputs are
        skipped with a warning.

        Args:
            tta: Test-time augmentation: "none" (the centre crop), "flip" (and its mirror
                image) or "10crop" (four corners and centre, each also mirrored); the softmax
                is averaged over the views. ``batch_size`` counts images, not views.
        """
        views = self.views(tta)
        batch: list[tuple[ImageInput, torch.Tensor]] = []

        def flush() -> Iterator[tuple[ImageInput, np.ndarray]]:
            x = torch.cat([t for _, t in batch]).to(self.device)  # (images * views, 3, H, W)
            with torch.inference_mode():
                probs = self.model(x).float().softmax(1)
            probs = probs.view(len(batch), views.count, -1).mean(1).cpu().numpy()
            yield from zip((src for src, _ in batch), probs, strict=True)
            batch.clear()

        for image in images:
            try:
                array = self._decode(image)
            except (OSError, ValueError) as exc:
                warnings.warn(f"Skipping {image}: cannot decode it ({exc})", stacklevel=3)
                continue
            batch.append((image, views(array)))
            if len(batch) == batch_size:
                yield from flush()
        if batch:
            yield from flush()

    def iter_predict(
        self,
        images: Iterable[ImageInput],
        top_k: int = 5,
        batch_size: int = 32,
        tta: str = "none",
    ) -> Iterator[Prediction]:
        """Yield a :class:`Prediction` per image as batches complete (streams large folders)."""
        k = max(1, min(top_k, len(self.classes)))
        with torch.inference_mode():
            for source, probs in self.iter_proba(images, batch_size, tta):
                order = np.argsort(-probs, kind="stable")[:k]
                ranked = tuple((self.classes[i], float(probs[i])) for i in order)
                path = str(source) if isinstance(source, (str, Path)) else None
                yield Prediction(path, ranked[0][0], ranked[0][1], ranked)

    def predict(
        self,
        images: Iterable[ImageInput] | ImageInput,
        top_k: int = 5,
        batch_size: int = 32,
        tta: str = "none",
    ) -> list[Prediction]:
        """Classify images: paths, PIL images or uint8 RGB arrays (one, or an iterable of them).

        ``tta``: "none", "flip" or "10crop" (see :meth:`iter_proba`)."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        return list(self.iter_predict(images, top_k=top_k, batch_size=batch_size, tta=tta))

    def evaluate(
        self, folder: str | Path, top_k: int = 5, batch_size: int = 32, tta: str = "none"
    ) -> Evaluation:
        """Accuracy, per-class metrics, confusion matrix and mistakes on a labelled folder (one
        sub-folder per class); see :func:`finetune.evaluate.evaluate`."""
        from finetune.evaluate import evaluate

        return evaluate(self, folder, top_k=top_k, batch_size=batch_size, tta=tta)


def load(
    path: str | Path, head: nn.Module | None = None, device: str | torch.device | None = None
) -> Predictor:
    """Load a run directory (its ``best.pt``), a checkpoint file, or a safetensors bundle,
    TorchScript file or ONNX file (from ``finetune export``) as a :class:`Predictor`.

    Args:
        path: A run directory written by ``fit``, a ``.pt`` checkpoint, or a bundle directory
            (or its ``model.safetensors``), a TorchScript ``.pt`` or a ``.onnx`` file.
        head: An instance of the custom head the model was trained with, if any.
        device: Where to run; default cuda when available.
    """
    if is_torchscript(path):
        module, meta = read_torchscript(path)
    elif is_onnx(path):
        module, meta = read_onnx(path)
    else:
        checkpoint = read_bundle(path) if is_bundle(path) else load_checkpoint(path)
        model = rebuild_model(checkpoint, head)
        return Predictor(model, checkpoint["classes"], preprocessing_of(checkpoint), device)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    return Predictor(module, meta["classes"], pre, device)
