"""Dataset -> tensors: the preprocessing contract of a model and its albumentations pipelines.

:class:`Preprocessing` comes from the timm model's pretrained config (mean, std, crop_pct,
interpolation), with the input size chosen for the data; it is saved in every checkpoint so that
prediction preprocesses exactly as training did.

- Training (:func:`train_transform`): random resized crop, flips (vertical and 90-degree
  rotations for domains without an "up"), colour jitter and AlexNet's PCA lighting
  (:class:`PCALighting`, its eigenvectors measured on the training set by :func:`fit_lighting`),
  then normalisation. :class:`Augmentation` holds the settings; :data:`PRESETS` names four.
- Evaluation (:func:`eval_transform`): resize the short side to ``input_size / crop_pct``, then
  centre-crop.
- Both can stop before normalising (``normalize=False``: uint8 tensors) and leave it to the
  device (:class:`DeviceNormalize`): what the training loaders do, since float32 batches are
  four times the bytes through the workers' shared memory and the pinned and device copies.
- Test-time augmentation (:class:`TestTimeViews`): the centre crop, its mirror image, or ten
  crops (four corners and the centre, each also mirrored); predictions average their softmax.
"""

from __future__ import annotations

import functools
import io
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import albumentations as A
import cv2
import numpy as np
import timm.data
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch import nn

from finetune.config import (  # *_BELOW: torch-free there, for --augment's help
    AUGMENT_FIELDS,
    DEFAULT_BELOW,
    STRONG_BELOW,
    TTA_MODES,
    FitConfig,
)
from finetune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "IMAGENET_LIGHTING",
    "PRESETS",
    "Augmentation",
    "DeviceNormalize",
    "Lighting",
    "PCALighting",
    "Preprocessing",
    "TestTimeViews",
    "augmentation_ops",
    "choose_image_size",
    "eval_transform",
    "fit_lighting",
    "preset_for",
    "preview_figure",
    "resize_side",
    "train_transform",
]

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


# --- training augmentation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation settings. A preset (:data:`PRESETS`) fills every field; the
    matching :class:`~finetune.FitConfig` options override single fields."""

    preset: str = "default"  # the preset the other fields started from
    crop: bool = True  # random resized crop; False: resize + centre crop, as in evaluation
    crop_scale: tuple[float, float] = (0.35, 1.0)  # random crop's area, as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random crop's aspect-ratio range
    hflip: bool = True  # mirror left-right half the time
    vflip: bool = False  # also upside down half the time (domains without an "up")
    rotate90: bool = False  # a random multiple of 90 degrees (microscopy, aerial images...)
    brightness: float = 0.2  # colour jitter: factors drawn from [1 - x, 1 + x]...
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02  # ...and a hue shift in [-x, x] (fraction of the colour circle)
    jitter_p: float = 0.8  # probability that an image is colour-jittered at all
    lighting: float = 0.1  # sigma of AlexNet's PCA lighting (0: off); AlexNet used 0.1

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> Augmentation:
        """The preset called ``preset`` with some fields replaced (``None`` values are ignored)."""
        if preset not in PRESETS:
            raise ConfigError(
                f"Unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}."
            )
        return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "crop_scale": list(self.crop_scale),
            "crop_ratio": list(self.crop_ratio),
        }

    def describe(self) -> str:
        """One line for people, e.g. "strong: crop 15-100%, flips h, jitter 0.4, lighting 0.2"."""
        if not (self.crop or self.hflip or self.vflip or self.rotate90 or self.jitter_p) and not (
            self.lighting
        ):
            return f"{self.preset}: resize and centre crop only"
        parts = [
            f"crop {self.crop_scale[0]:.0%}-{self.crop_scale[1]:.0%} of the area"
            if self.crop
            else "centre crop"
        ]
        flips = "".join(name for name, on in (("h", self.hflip), ("v", self.vflip)) if on)
        if flips:
            parts.append(f"flip {flips}")
        if self.rotate90:
            parts.append("rotate 90")
        if self.jitter_p and (self.brightness or self.contrast or self.saturation or self.hue):
            parts.append(
                f"colour jitter {max(self.brightness, self.contrast, self.saturation):g}"
                f" (hue {self.hue:g}, p {self.jitter_p:g})"
            )
        if self.lighting:
            parts.append(f"PCA lighting {self.lighting:g}")
        return f"{self.preset}: " + ", ".join(parts)


PRESETS: dict[str, Augmentation] = {
    "none": Augmentation(
        "none", crop=False, hflip=False, brightness=0, contrast=0, saturation=0, hue=0,
        jitter_p=0, lighting=0,
    ),
    "light": Augmentation(
        "light", crop_scale=(0.6, 1.0), brightness=0.1, contrast=0.1, saturation=0.1, hue=0,
        jitter_p=0.5, lighting=0.05,
    ),
    "default": Augmentation("default"),
    "strong": Augmentation(
        "strong", crop_scale=(0.15, 1.0), brightness=0.4, contrast=0.4, saturation=0.4,
        hue=0.05, lighting=0.2,
    ),
}  # fmt: skip


def preset_for(per_class: float) -> tuple[str, str]:
    """The augmentation preset for a dataset of ``per_class`` training images per class (median),
    and why: the less data, the stronger the augmentation."""
    if per_class < STRONG_BELOW:
        return "strong", f"median {per_class:g} images per class (< {STRONG_BELOW})"
    if per_class < DEFAULT_BELOW:
        return "default", f"median {per_class:g} images per class (< {DEFAULT_BELOW})"
    return "light", f"median {per_class:g} images per class (>= {DEFAULT_BELOW})"


@dataclass(frozen=True)
class Lighting:
    """Principal components of a dataset's RGB pixel values (0-1 scale), for PCA lighting."""

    eigval: tuple[float, float, float]  # variance along each component, largest first
    eigvec: tuple[tuple[float, float, float], ...]  # 3x3; column j is component j
    source: str  # where they come from, e.g. "training set (400 images)"

    def to_dict(self) -> dict[str, Any]:
        return {"eigval": list(self.eigval), "eigvec": [list(r) for r in self.eigvec],
                "source": self.source}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lighting:
        return cls(tuple(data["eigval"]), tuple(tuple(r) for r in data["eigvec"]), data["source"])


# AlexNet's PCA of ImageNet's RGB pixels (0-1 scale) as published with fb.resnet.torch and
# GluonCV; the fallback when the training images cannot be measured.
IMAGENET_LIGHTING = Lighting(
    eigval=(0.2175, 0.0188, 0.0045),
    eigvec=((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203)),
    source="ImageNet (AlexNet's published PCA)",
)


def fit_lighting(
    paths: Sequence[str | Path], max_images: int = 500, pixels_per_image: int = 1024, seed: int = 0
) -> Lighting:
    """PCA of the RGB pixel values of the training images, as AlexNet computed it over ImageNet.

    A seeded sample of ``max_images`` images contributes ``pixels_per_image`` random pixels
    each (JPEGs decode at reduced size, so large photos cost little). Falls back to
    :data:`IMAGENET_LIGHTING` when no image can be read.
    """
    from finetune.data.images import pil_to_rgb, read_image_bytes

    chosen = sorted(random.Random(seed).sample(range(len(paths)), min(len(paths), max_images)))
    rng = np.random.default_rng(seed)
    rows = []
    for i in chosen:
        try:
            with Image.open(io.BytesIO(read_image_bytes(paths[i]))) as img:  # regular files only
                img.draft("RGB", (256, 256))  # JPEG: decode at 1/2..1/8 scale
                pixels = pil_to_rgb(img).reshape(-1, 3)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if len(pixels) > pixels_per_image:
            pixels = pixels[rng.choice(len(pixels), pixels_per_image, replace=False)]
        rows.append(pixels)
    if not rows:
        return IMAGENET_LIGHTING
    covariance = np.cov(np.concatenate(rows).astype(np.float64) / 255.0, rowvar=False)
    eigval, eigvec = np.linalg.eigh(covariance)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    return Lighting(
        tuple(float(v) for v in eigval),
        tuple(tuple(float(v) for v in row) for row in eigvec),
        f"training set ({len(rows)} images)",
    )


class PCALighting(A.ImageOnlyTransform):
    """AlexNet's PCA lighting (Krizhevsky et al. 2012, section 4.1): every pixel of an image gets
    ``eigvec @ (alpha * eigval)`` added, with ``alpha ~ N(0, sigma)`` drawn once per image.

    The components are those of the whole training set (:func:`fit_lighting`), which is what
    AlexNet did; albumentations' ``FancyPCA`` instead takes the PCA of each image on its own.
    Works on uint8 (0-255) and float (0-1) RGB images; the result is clipped to the valid range.
    Any other input is refused rather than silently mis-scaled.
    """

    def __init__(
        self, lighting: Lighting = IMAGENET_LIGHTING, sigma: float = 0.1, p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        if sigma < 0:
            raise ConfigError(f"PCA lighting sigma must be >= 0, got {sigma}.")
        self.lighting = lighting
        self.sigma = sigma
        self._eigval = np.asarray(lighting.eigval, dtype=np.float32)
        self._eigvec = np.asarray(lighting.eigvec, dtype=np.float32)

    def get_params(self) -> dict[str, Any]:
        return {"alpha": self.random_generator.normal(0.0, self.sigma, 3).astype(np.float32)}

    def apply(self, img: np.ndarray, alpha: np.ndarray, **params: Any) -> np.ndarray:
        shift = self._eigvec @ (alpha * self._eigval)  # (3,) on the 0-1 scale
        if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
            # A per-channel lookup table instead of float arithmetic on every pixel (docs/speed.md).
            levels = np.arange(256, dtype=np.float32)[:, None] + shift * 255.0
            table = np.clip(np.rint(levels), 0, 255).astype(np.uint8).reshape(256, 1, 3)
            return cv2.LUT(img, table)
        if np.issubdtype(img.dtype, np.floating) and img.ndim == 3 and img.shape[2] == 3:
            return np.clip(img + shift.astype(img.dtype), 0.0, 1.0)
        raise DataError(
            f"PCA lighting needs RGB images (H, W, 3), uint8 or float; got {img.dtype} {img.shape}."
        )

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("lighting", "sigma")


def augmentation_ops(
    pre: Preprocessing, aug: Augmentation, lighting: Lighting | None = None
) -> list[A.BasicTransform]:
    """The random part of the training pipeline: uint8 RGB in, uint8 RGB of the input size out."""
    side = pre.input_size
    if aug.crop:
        ops: list[A.BasicTransform] = [
            A.RandomResizedCrop(
                size=(side, side),
                scale=aug.crop_scale,
                ratio=aug.crop_ratio,
                interpolation=pre.cv2_interpolation,
            )
        ]
    else:
        ops = [
            A.SmallestMaxSize(max_size=resize_side(pre), interpolation=pre.cv2_interpolation),
            A.CenterCrop(height=side, width=side),
        ]
    if aug.hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if aug.vflip:
        ops.append(A.VerticalFlip(p=0.5))
    if aug.rotate90:
        ops.append(A.RandomRotate90(p=1.0))  # 0, 90, 180 or 270 degrees, equally likely
    if aug.jitter_p and (aug.brightness or aug.contrast or aug.saturation or aug.hue):
        ops.append(
            A.ColorJitter(
                brightness=aug.brightness,
                contrast=aug.contrast,
                saturation=aug.saturation,
                hue=aug.hue,
                p=aug.jitter_p,
            )
        )
    if aug.lighting:
        ops.append(PCALighting(lighting or IMAGENET_LIGHTING, sigma=aug.lighting))
    return ops


def _to_tensor(pre: Preprocessing, normalize: bool = True) -> list[A.BasicTransform]:
    if not normalize:  # uint8 (3, H, W): DeviceNormalize finishes the job on the device
        return [ToTensorV2()]
    return [A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0), ToTensorV2()]


@dataclass(frozen=True)
class DeviceNormalize:
    """The normalisation that a pipeline built with ``normalize=False`` leaves out, done where
    the batch is: uint8 (N, 3, H, W) images in, ``(x / 255 - mean) / std`` in float32 out, in the
    images' memory layout. A batch that is not uint8 (already normalised, or a frozen layer's
    output) passes unchanged.

    Why: a DataLoader moves each batch through shared memory from its worker, then into pinned
    memory, then to the GPU; in float32 that is 0.6 MB per 224 px image, and those copies, not
    the augmentation, bounded an epoch on a GPU (``benchmarks/gpu_check.py``'s "loader alone"
    row; docs/speed.md has the numbers). uint8 is a quarter of the bytes. On a CPU too the
    uint8 loader was faster, with or without workers (``benchmarks/loader_transport.py``).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, pre: Preprocessing) -> DeviceNormalize:
        return cls(tuple(pre.mean), tuple(pre.std))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        # (x / 255 - mean) / std as x * scale + shift: one pass after the conversion.
        # Elementwise, so the result keeps the images' layout (NHWC stays NHWC).
        scale, shift = _scale_shift(self.mean, self.std, images.device)
        return images.float().mul_(scale).add_(shift)


@functools.lru_cache(maxsize=32)
def _scale_shift(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeviceNormalize's factors, made once per device: copying them from the host for every
    batch would make the training process wait for the GPU twice a step (a copy from pageable
    memory synchronises)."""
    shape = (1, len(mean), 1, 1)
    mean64 = torch.tensor(mean, dtype=torch.float64).view(shape)
    std64 = torch.tensor(std, dtype=torch.float64).view(shape)
    scale = (1 / (255 * std64)).to(device, torch.float32)
    shift = (-mean64 / std64).to(device, torch.float32)
    return scale, shift


def resize_side(pre: Preprocessing) -> int:
    """The short side evaluation resizes images to before its centre crop."""
    return math.floor(pre.input_size / pre.crop_pct)


def train_transform(
    pre: Preprocessing,
    aug: Augmentation | None = None,
    lighting: Lighting | None = None,
    seed: int | None = None,
    *,
    normalize: bool = True,
) -> A.Compose:
    """Training pipeline: :func:`augmentation_ops` (``aug`` defaults to the "default" preset),
    then normalisation with the backbone's mean/std and a (3, H, W) float tensor; with
    ``normalize=False`` a (3, H, W) uint8 tensor, for :class:`DeviceNormalize` to finish."""
    ops = augmentation_ops(pre, aug or PRESETS["default"], lighting)
    return A.Compose([*ops, *_to_tensor(pre, normalize)], seed=seed)


def eval_transform(pre: Preprocessing, *, normalize: bool = True) -> A.Compose:
    """Evaluation: resize the short side to input_size / crop_pct, centre-crop input_size
    (``normalize=False``: a uint8 tensor, as in :func:`train_transform`)."""
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=resize_side(pre), interpolation=pre.cv2_interpolation),
            A.CenterCrop(height=pre.input_size, width=pre.input_size),
            *_to_tensor(pre, normalize),
        ]
    )


# --- test-time augmentation ---------------------------------------------------------------------


class TestTimeViews:
    """The views of an image that test-time augmentation averages over.

    The image is resized as for evaluation (short side to input_size / crop_pct); then
    ``none`` takes the centre crop (exactly :func:`eval_transform`), ``flip`` the centre crop
    and its mirror image, ``10crop`` the four corner crops and the centre crop, each also
    mirrored (Krizhevsky et al. 2012).
    """

    __test__ = False  # not a pytest class, despite its name

    def __init__(self, pre: Preprocessing, mode: str = "none") -> None:
        if mode not in TTA_MODES:
            raise ConfigError(f"Unknown TTA mode {mode!r}; choose one of {', '.join(TTA_MODES)}.")
        self.pre = pre
        self.mode = mode
        self._resize = A.SmallestMaxSize(
            max_size=resize_side(pre), interpolation=pre.cv2_interpolation, p=1.0
        )
        self._tensor = A.Compose(_to_tensor(pre))

    @property
    def count(self) -> int:
        """Views per image."""
        return {"none": 1, "flip": 2, "10crop": 10}[self.mode]

    def crops(self, image: np.ndarray) -> list[np.ndarray]:
        """The views as uint8 RGB arrays of the input size."""
        resized = self._resize(image=image)["image"]
        height, width = resized.shape[:2]
        s = self.pre.input_size
        top, left = (height - s) // 2, (width - s) // 2
        centre = resized[top : top + s, left : left + s]
        if self.mode == "none":
            return [centre]
        if self.mode == "flip":
            return [centre, centre[:, ::-1]]
        five = [
            resized[:s, :s],
            resized[:s, width - s :],
            resized[height - s :, :s],
            resized[height - s :, width - s :],
            centre,
        ]
        return five + [view[:, ::-1] for view in five]

    def to_tensor(self, view: np.ndarray) -> torch.Tensor:
        """One uint8 view -> the normalised (3, H, W) float tensor the model takes."""
        return self._tensor(image=np.ascontiguousarray(view))["image"]

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """(views, 3, H, W) normalised float tensor."""
        return torch.stack([self.to_tensor(v) for v in self.crops(image)])


# --- preview ------------------------------------------------------------------------------------


def preview_figure(
    images: Sequence[np.ndarray],
    ops: Sequence[A.BasicTransform],
    versions: int = 5,
    seed: int = 0,
    titles: Sequence[str] | None = None,
) -> Figure:
    """A grid: each row one original image, then ``versions`` augmented versions of it."""
    from matplotlib.figure import Figure

    pipeline = A.Compose(list(ops), seed=seed)
    columns = versions + 1
    fig = Figure(figsize=(1.6 * columns, 1.7 * len(images) + 0.4))
    for row, image in enumerate(images):
        ax = fig.add_subplot(len(images), columns, row * columns + 1)
        ax.imshow(image)
        ax.set_title(titles[row] if titles else "original", fontsize=7)
        ax.axis("off")
        for column in range(1, columns):
            ax = fig.add_subplot(len(images), columns, row * columns + column + 1)
            ax.imshow(pipeline(image=image)["image"])
            ax.axis("off")
    return fig


def augmentation_of(config: FitConfig) -> Augmentation:
    """The training augmentation ``config`` asks for: its preset with its overrides."""
    overrides = {name: getattr(config, name) for name in AUGMENT_FIELDS}
    return Augmentation.from_preset(config.augment or "default", **overrides)
