"""One image file -> an RGB uint8 array: decoding, EXIF orientation, colour modes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    pass

__all__ = ["IMAGE_EXTENSIONS", "load_image", "pil_to_rgb"]

IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)
_EXIF_ORIENTATION = 0x0112


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name == "__MACOSX"


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array of shape (H, W, 3).

    Greyscale, palette, CMYK and alpha images become 3-channel RGB (alpha on white).
    """
    with Image.open(path) as img:
        return pil_to_rgb(img)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an RGB ``uint8`` array, upright (EXIF orientation
    applied), alpha composited on white, 16-bit scaled (not clamped) to 8 bits."""
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
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
