"""One image file -> an RGB uint8 array: reading it safely, decoding, EXIF orientation, colour
modes.

Only regular files are read (after symlinks are resolved), at most :data:`MAX_FILE_BYTES` of
them, in chunks: a FIFO named ``x.png`` would block a plain ``open`` forever (and a blocked read
ignores Ctrl-C), and a symlink to ``/dev/zero`` would be read until memory runs out.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL import features as pil_features

if TYPE_CHECKING:
    pass

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_FILE_BYTES",
    "file_kind",
    "load_image",
    "pil_to_rgb",
    "read_image_bytes",
    "unsupported_format",
]

# .avif/.heic/.heif are listed so that such files are checked and, where this Pillow build
# cannot decode them, skipped with that reason rather than called "not an image file".
IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".avif",
     ".heic", ".heif"}
)  # fmt: skip
# The largest image file read, in bytes. Pillow refuses images over ~179 million pixels (its
# decompression-bomb limit); an uncompressed 16-bit RGB TIFF that size is ~1 GB, so no image
# Pillow would decode is refused here, and a runaway file (a device, a growing log) is cut off.
MAX_FILE_BYTES = 1 << 30
_CHUNK = 1 << 20  # read in 1 MiB chunks: Ctrl-C is seen between two chunks
_EXIF_ORIENTATION = 0x0112
_HEIF_BRANDS = {  # ISO base media "ftyp" brands of still images Pillow may not decode
    b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC",
    b"heis": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF",
}  # fmt: skip


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name == "__MACOSX"


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, for messages: "a FIFO", "a character device"..."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_image_bytes(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The content of the regular file ``path`` (a symlink is followed), read in chunks.

    The file is opened non-blocking, so a FIFO cannot block the open, and checked with
    ``fstat`` on the open descriptor (no race with a rename) before anything is read.

    Raises:
        OSError: ``path`` cannot be opened, is not a regular file (a FIFO, a device, a
            socket, a folder), or holds more than ``limit`` bytes; the message says which
            (without the path: callers name it).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{file_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise OSError(f"{info.st_size:,} bytes, over the {limit:,}-byte limit")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while chunk := os.read(fd, _CHUNK):
            size += len(chunk)
            if size > limit:  # grew while being read
                raise OSError(f"over the {limit:,}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def unsupported_format(data: bytes) -> str | None:
    """Why Pillow cannot decode ``data`` when it is a known image format this Pillow build
    lacks (AVIF without libavif, HEIC/HEIF), else None."""
    if data[4:8] != b"ftyp":
        return None
    kind = _HEIF_BRANDS.get(data[8:12])
    if kind is None or (kind == "AVIF" and pil_features.check("avif")):
        return None
    return (
        f"{kind} image, a format this Pillow build ({Image.__version__}) cannot decode; "
        "convert it to PNG or JPEG"
    )


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array of shape (H, W, 3).

    Greyscale, palette, CMYK and alpha images become 3-channel RGB (alpha on white).

    Raises:
        OSError: the file cannot be read (see :func:`read_image_bytes`) or decoded (Pillow's
            ``UnidentifiedImageError``, naming an unsupported format such as HEIC).
        ValueError, PIL.Image.DecompressionBombError: as Pillow raises them.
    """
    data = read_image_bytes(path)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        why = unsupported_format(data)
        if why is None:
            raise
        raise UnidentifiedImageError(f"{path}: {why}") from exc
    with img:
        return pil_to_rgb(img)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an RGB ``uint8`` array, upright (EXIF orientation
    applied), alpha composited on white, 16-bit scaled (not clamped) to 8 bits, floating point
    (mode ``F``, e.g. a float TIFF) scaled by :func:`_float_to_uint8`."""
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
    elif img.mode == "F":
        grey = _float_to_uint8(np.asarray(img, dtype=np.float64))
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(img.convert("RGB"))  # a writable copy


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Floating-point pixels to 0-255. Values within [0, 1] (the usual convention) are scaled
    by 255; any other range is stretched from its minimum to its maximum. Pillow's own
    conversion clamps instead, which turns a 0-1 image all black. NaN and infinities become 0."""
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif hi > lo:
        scaled = (arr - lo) / (hi - lo) * 255.0
    else:  # one value everywhere, outside [0, 1]
        scaled = arr
    scaled = np.where(finite, scaled, 0.0)
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
