"""Folder -> dataset: find the classes and images of a folder-per-class tree and split them.

Layouts understood (class folders may hold images at any depth):

    root/<class>/*.png                      seeded, stratified train/val split (val_split)
    root/train/<class>/..., root/val/<class>/...   (``valid/`` works too; ``test/`` is left alone)

Hidden files and folders (``.name``) are never classes or images. Files that are not images,
and images that cannot be opened, are skipped with a warning that names them.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from finetune.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetSplit",
    "ImageDataset",
    "Sample",
    "collate_skipping_failed",
    "iter_image_files",
    "load_image",
    "scan_folder",
]

IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)
_VAL_NAMES = ("val", "valid", "validation")


@dataclass(frozen=True)
class Sample:
    """One image file and the index of its class."""

    path: Path
    label: int


@dataclass(frozen=True)
class DatasetSplit:
    """The classes of a folder and its train and validation samples."""

    root: Path
    classes: tuple[str, ...]  # sorted class-folder names; label i is classes[i]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    layout: str  # "train/val folders" or "random split"
    skipped: tuple[tuple[Path, str], ...]  # (file, reason) for files that are not usable images
    median_side: int  # median of min(width, height) over the training images, in pixels

    def counts(self, split: str) -> dict[str, int]:
        """Images per class in ``"train"`` or ``"val"``."""
        samples = self.train if split == "train" else self.val
        counts = dict.fromkeys(self.classes, 0)
        for s in samples:
            counts[self.classes[s.label]] += 1
        return counts


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name == "__MACOSX"


def iter_image_files(folder: Path) -> list[Path]:
    """All files below ``folder`` with an image extension, sorted, hidden entries excluded."""
    found: list[Path] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part == "__MACOSX" for part in rel.parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(path)
    return found


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p))


def _probe(path: Path) -> tuple[int, int] | str:
    """(width, height) of a readable image, or the reason it cannot be used."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"not a readable image ({type(exc).__name__}: {exc})"


def _collect(folder: Path, classes: Sequence[str]) -> tuple[list[Sample], list, list[int]]:
    samples: list[Sample] = []
    skipped: list[tuple[Path, str]] = []
    sides: list[int] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for path in iter_image_files(class_dir):
            probed = _probe(path)
            if isinstance(probed, str):
                skipped.append((path, probed))
                continue
            sides.append(min(probed))
            samples.append(Sample(path, label))
        for path in sorted(class_dir.rglob("*")):
            if (
                path.is_file()
                and path.suffix.lower() not in IMAGE_EXTENSIONS
                and not any(p.startswith(".") for p in path.relative_to(class_dir).parts)
            ):
                skipped.append((path, "not an image file (unknown extension)"))
    return samples, skipped, sides


def _non_empty_classes(folder: Path) -> list[str]:
    names = []
    for class_dir in _class_folders(folder):
        if iter_image_files(class_dir):
            names.append(class_dir.name)
        else:
            warnings.warn(
                f"Class folder {class_dir} holds no images; it is not used as a class.",
                stacklevel=3,
            )
    return names


def scan_folder(root: str | Path, val_split: float = 0.2, seed: int = 0) -> DatasetSplit:
    """Find the classes and images under ``root`` and split them into train and val.

    Args:
        root: A folder-per-class tree, or a folder holding ``train/`` and ``val/`` trees.
        val_split: Fraction of each class held out for validation when there is no ``val/``.
        seed: Seed of the stratified split.

    Raises:
        DataError: The folder is missing, has fewer than two classes, or a class is too small.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder. Give a folder with one sub-folder per class.")
    val_dir = next((root / n for n in _VAL_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        classes = _non_empty_classes(root / "train")
        _check_classes(root / "train", classes)
        train, skipped, sides = _collect(root / "train", classes)
        val, val_skipped, _ = _collect(val_dir, classes)
        extra = sorted(
            p.name for p in _class_folders(val_dir) if p.name not in classes and iter_image_files(p)
        )
        if extra:
            raise DataError(
                f"{val_dir} has class folders that {root / 'train'} lacks: {', '.join(extra)}. "
                "Every validation class needs training images: add them to train/ or remove them."
            )
        skipped += val_skipped
        layout = "train/val folders"
    else:
        classes = _non_empty_classes(root)
        _check_classes(root, classes)
        samples, skipped, sides = _collect(root, classes)
        train, val = _split(root, samples, classes, val_split, seed)
        layout = "random split"
    for path, reason in skipped:
        warnings.warn(f"Skipping {path}: {reason}", stacklevel=2)
    if not val:
        raise DataError(f"{val_dir or root} has no usable validation images.")
    return DatasetSplit(
        root=root,
        classes=tuple(classes),
        train=tuple(train),
        val=tuple(val),
        layout=layout,
        skipped=tuple(skipped),
        median_side=int(statistics.median(sides)) if sides else 0,
    )


def _check_classes(root: Path, classes: Sequence[str]) -> None:
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(
            f"{root} needs at least two class folders with images (found {found}). "
            "Put each class's images in its own sub-folder, e.g. root/cat/*.jpg, root/dog/*.jpg."
        )


def _split(
    root: Path, samples: list[Sample], classes: Sequence[str], val_split: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    labels = [s.label for s in samples]
    counts = np.bincount(labels, minlength=len(classes))
    small = [f"{classes[i]} ({n})" for i, n in enumerate(counts) if n < 2]
    if small:
        raise DataError(
            f"Cannot split {root} into train and val: class(es) {', '.join(small)} have fewer than "
            "2 readable images. Add images, or give train/ and val/ folders yourself."
        )
    n_val = max(round(val_split * len(samples)), len(classes))
    if n_val >= len(samples) - len(classes) + 1:
        raise DataError(
            f"{root} has {len(samples)} images for {len(classes)} classes: too few to hold out "
            f"{val_split:.0%} for validation with every class on both sides. Add images."
        )
    from sklearn.model_selection import train_test_split  # 1 s to import; only splits need it

    train, val = train_test_split(
        samples, test_size=n_val, random_state=seed, stratify=labels, shuffle=True
    )
    return sorted(train, key=lambda s: s.path), sorted(val, key=lambda s: s.path)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array of shape (H, W, 3).

    Greyscale, palette, CMYK and alpha images become 3-channel RGB (alpha on white).
    """
    with Image.open(path) as img:
        return pil_to_rgb(img)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an RGB ``uint8`` array."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(img.convert("RGB"))  # a writable copy


class ImageDataset(torch.utils.data.Dataset):
    """Decodes samples and applies an albumentations transform; a failed decode yields ``None``."""

    def __init__(
        self, samples: Sequence[Sample], transform: Callable[..., dict] | None = None
    ) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        sample = self.samples[index]
        try:
            image = load_image(sample.path)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            warnings.warn(f"Skipping {sample.path}: cannot decode it ({exc})", stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, sample.label


def collate_skipping_failed(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Default collation without the images that failed to decode (``None`` entries)."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)
