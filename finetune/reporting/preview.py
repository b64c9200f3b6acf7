"""``finetune augment-preview``: a picture of what the training augmentation does to images.

The data folder is scanned as ``fit`` scans it, so an image file that cannot be read is left
out with its reason (told to ``on_skip``) and the preview is made of the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.config import (
    FitConfig,
)
from finetune.data.scan import Sample, scan_folder
from finetune.data.transforms import (
    Lighting,
    Preprocessing,
    augmentation_of,
    augmentation_ops,
    choose_image_size,
    fit_lighting,
    preset_for,
    preview_figure,
)
from finetune.errors import DataError
from finetune.files import atomic_write
from finetune.inference.inputs import (
    OnSkip,
    Skipped,
    UnreadableImage,
    read_image,
    report_skip,
    unreadable_files,
)
from finetune.model.backbone import create_backbone
from finetune.strategies.measure import (
    measure_size,
)

__all__ = ["augment_preview"]


def augment_preview(
    data: str | Path,
    out: str | Path,
    config: FitConfig | None = None,
    *,
    images: int = 4,
    versions: int = 5,
    pca: Lighting | None = None,
    on_skip: OnSkip | None = None,
    **options: Any,
) -> Path:
    """Write a PNG grid of training images beside augmented versions of them: what the model
    sees in training with these options (``augment``, ``crop_scale``, ``lighting``... of
    :class:`FitConfig`; the preset is chosen from the data size as ``fit`` would).

    Args:
        pca: The principal components of the training images' colours for PCA lighting, when
            the caller has them (a run's checkpoint does) [default: measured on the images,
            as ``fit`` measures them: seconds for camera-sized JPEGs].
        on_skip: Told of each image file of ``data`` that cannot be read, which is left out
            as ``fit`` leaves it out [default: the scan's are not told again (``fit`` and
            ``finetune check`` list them; the report embeds this preview), and a picked image
            that cannot be read now (changed since the scan) is a warning].

    Returns:
        The path of the PNG: ``out``, or ``out/augment-preview.png`` when ``out`` is a folder.
    """
    out = Path(out).expanduser()
    if out.is_dir():  # a folder names where the picture goes, as `-o DIR` does in the CLI
        out = out / "augment-preview.png"
    config = FitConfig.from_kwargs(config, **options)
    split = scan_folder(data, val_split=config.val_split, seed=config.seed)
    backbone = create_backbone(config.model, pretrained=False)
    native = Preprocessing.from_model(backbone).input_size
    side = config.image_size or choose_image_size(native, split.median_side)
    pre = Preprocessing.from_model(backbone, side)
    preset, _ = preset_for(measure_size(split).per_class_median)
    augmentation = augmentation_of(dataclasses.replace(config, augment=config.augment or preset))
    lighting = pca or fit_lighting([s.path for s in split.train], seed=config.seed)
    if on_skip is not None:
        for skip in unreadable_files(split.report):
            on_skip(skip)
    picked, arrays = _pick(split.train, max(1, images), on_skip)
    if not picked:
        raise DataError(
            f"None of the training images of {split.root} could be read now (they changed "
            f"since the scan); run `finetune check {split.root}`."
        )
    figure = preview_figure(
        arrays,
        augmentation_ops(pre, augmentation, lighting),
        versions=versions,
        seed=config.seed,
        titles=[split.classes[s.label] for s in picked],
    )
    figure.suptitle(f"augmentation {augmentation.describe()}, {side} px", fontsize=8)
    kind = out.suffix.lstrip(".") or None  # as savefig infers it from a file name
    return atomic_write(out, lambda f: figure.savefig(f, dpi=110, bbox_inches="tight", format=kind))


def _pick(
    train: Sequence[Sample], count: int, on_skip: OnSkip | None
) -> tuple[list[Sample], list[np.ndarray]]:
    """An image from each of the first ``count`` classes (its last training image), so the rows
    differ, decoded; an image that cannot be read now (it changed since the scan) is told to
    ``on_skip`` and the class's previous one taken."""
    by_class: dict[int, list[Sample]] = {}
    for sample in train:
        by_class.setdefault(sample.label, []).append(sample)
    picked: list[Sample] = []
    arrays: list[np.ndarray] = []
    for members in by_class.values():
        for sample in reversed(members):
            if len(picked) == count:
                return picked, arrays
            try:
                arrays.append(read_image(sample.path))
            except UnreadableImage as exc:
                report_skip(Skipped(str(sample.path), exc.reason), on_skip)
                continue
            picked.append(sample)
            break
    return picked, arrays
