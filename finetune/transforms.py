"""Dataset -> tensors: the preprocessing contract of a model and its albumentations pipelines.

:class:`Preprocessing` comes from the timm model's pretrained config (mean, std, crop_pct,
interpolation), with the input size chosen for the data; it is saved in every checkpoint so that
prediction preprocesses exactly as training did.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import albumentations as A
import cv2
import timm.data
from albumentations.pytorch import ToTensorV2
from torch import nn

__all__ = ["Preprocessing", "choose_image_size", "eval_transform", "train_transform"]

_CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into model inputs (the part of a checkpoint predict relies on)."""

    input_size: int  # side of the square crop fed to the model
    mean: tuple[float, float, float]  # per-channel mean of the pretrained weights (0-1 scale)
    std: tuple[float, float, float]  # per-channel std of the pretrained weights
    crop_pct: float  # eval: resize the short side to input_size / crop_pct, then centre-crop
    interpolation: str  # resampling used by the pretrained weights ("bicubic", "bilinear", ...)

    @classmethod
    def from_model(cls, model: nn.Module, input_size: int | None = None) -> Preprocessing:
        """Read mean/std/crop_pct/interpolation from a timm model's pretrained config."""
        cfg = timm.data.resolve_model_data_config(model)
        return cls(
            input_size=int(input_size or cfg["input_size"][-1]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            crop_pct=float(cfg.get("crop_pct") or 0.875),
            interpolation=str(cfg.get("interpolation") or "bilinear"),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls(
            input_size=int(data["input_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            crop_pct=float(data["crop_pct"]),
            interpolation=str(data["interpolation"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @property
    def cv2_interpolation(self) -> int:
        return _CV2_INTERPOLATION.get(self.interpolation, cv2.INTER_LINEAR)


def choose_image_size(model_size: int, median_side: int) -> int:
    """The model's native input size, but never more than ~2x the images' own size.

    Upsampling a 28 px image to 224 px adds no information and costs ~12x the compute of 64 px;
    the result is a multiple of 32 (the stride of most backbones) and at least 64.
    """
    if median_side <= 0:
        return model_size
    return min(model_size, max(64, 32 * math.ceil(2 * median_side / 32)))


def train_transform(pre: Preprocessing, seed: int | None = None) -> A.Compose:
    """Training augmentation: random resized crop, horizontal flip, mild colour jitter."""
    size = (pre.input_size, pre.input_size)
    return A.Compose(
        [
            A.RandomResizedCrop(
                size=size,
                scale=(0.35, 1.0),
                ratio=(3 / 4, 4 / 3),
                interpolation=pre.cv2_interpolation,
            ),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
            A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0),
            ToTensorV2(),
        ],
        seed=seed,
    )


def eval_transform(pre: Preprocessing) -> A.Compose:
    """Evaluation: resize the short side to input_size / crop_pct, centre-crop input_size."""
    resize_to = math.floor(pre.input_size / pre.crop_pct)
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=resize_to, interpolation=pre.cv2_interpolation),
            A.CenterCrop(height=pre.input_size, width=pre.input_size),
            A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
