"""``finetune augment-preview``: a picture of what the training augmentation does to images."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from finetune.config import (
    FitConfig,
)
from finetune.data.images import load_image
from finetune.data.scan import scan_folder
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
from finetune.files import atomic_write
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
    **options: Any,
) -> Path:
    """Write a PNG grid of training images beside augmented versions of them: what the model
    sees in training with these options (``augment``, ``crop_scale``, ``lighting``... of
    :class:`FitConfig`; the preset is chosen from the data size as ``fit`` would).

    Args:
        pca: The principal components of the training images' colours for PCA lighting, when
            the caller has them (a run's checkpoint does) [default: measured on the images,
            as ``fit`` measures them: seconds for camera-sized JPEGs].

    Returns:
        The path of the PNG.
    """
    config = FitConfig.from_kwargs(config, **options)
    split = scan_folder(data, val_split=config.val_split, seed=config.seed)
    backbone = create_backbone(config.model, pretrained=False)
    native = Preprocessing.from_model(backbone).input_size
    side = config.image_size or choose_image_size(native, split.median_side)
    pre = Preprocessing.from_model(backbone, side)
    preset, _ = preset_for(measure_size(split).per_class_median)
    augmentation = augmentation_of(dataclasses.replace(config, augment=config.augment or preset))
    lighting = pca or fit_lighting([s.path for s in split.train], seed=config.seed)
    # One image from each of the first classes, so the rows differ.
    picked = list({s.label: s for s in split.train}.values())[: max(1, images)]
    figure = preview_figure(
        [load_image(s.path) for s in picked],
        augmentation_ops(pre, augmentation, lighting),
        versions=versions,
        seed=config.seed,
        titles=[split.classes[s.label] for s in picked],
    )
    figure.suptitle(f"augmentation {augmentation.describe()}, {side} px", fontsize=8)
    out = Path(out).expanduser()
    kind = out.suffix.lstrip(".") or None  # as savefig infers it from a file name
    return atomic_write(out, lambda f: figure.savefig(f, dpi=110, bbox_inches="tight", format=kind))
