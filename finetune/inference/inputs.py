"""Images in, for ``predict``, ``evaluate`` and the report: any input -> an RGB array, or the
reason it is not a usable image.

An input that is not a usable image (unreadable, truncated, empty, not an image whatever its
name, a decompression bomb, a folder or a FIFO named ``x.png``) raises
:class:`UnreadableImage`, whose reason the callers report as a :class:`Skipped` to an
``on_skip`` callable (by default, as a warning) before they go on with the other inputs: one
bad file never costs the others their predictions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from finetune.data.images import IMAGE_EXTENSIONS, load_image, pil_to_rgb
from finetune.data.scan import ScanReport, check_file
from finetune.errors import DataError

__all__ = [
    "ImageInput",
    "OnSkip",
    "Skipped",
    "UnreadableImage",
    "read_image",
    "report_skip",
    "unreadable_files",
]

ImageInput = str | Path | Image.Image | np.ndarray
# What decoding an input that is not a usable image raises: OSError (cannot be read, not a
# regular file, truncated, not an image at all: UnidentifiedImageError), ValueError, and
# SyntaxError or EOFError (Pillow's plugins on a damaged header or stream: a fuzzed PNG
# raises SyntaxError), and a decompression bomb (see read_image).
_UNREADABLE = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


@dataclass(frozen=True)
class Skipped:
    """An input that was not classified, and why; the other inputs were."""

    path: str | None  # the file, when the input was one
    reason: str  # for people: "decompression bomb: ...", "empty file (0 bytes)"
    index: int | None = None  # its position among the inputs given (names an in-memory image)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "index": self.index}


OnSkip = Callable[[Skipped], object]  # told of each input left out


def report_skip(skip: Skipped, on_skip: OnSkip | None) -> None:
    """Tell ``on_skip`` of an input left out, or warn when nobody asked."""
    if on_skip is not None:
        on_skip(skip)
        return
    what = skip.path if skip.path is not None else f"input {skip.index}"
    warnings.warn(f"Skipping {what}: {skip.reason}", stacklevel=4)


class UnreadableImage(DataError):
    """An input that is not a usable image: classifying goes on without it."""

    def __init__(self, image: ImageInput, reason: str) -> None:
        self.path = str(image) if isinstance(image, (str, Path)) else None
        self.reason = reason  # for people: "decompression bomb: ...", "empty file (0 bytes)"
        super().__init__(f"{self.path or f'a {type(image).__name__}'}: {reason}")


def read_image(image: ImageInput) -> np.ndarray:
    """Any accepted input (a file, a PIL image, an array) -> uint8 (H, W, 3) RGB array.

    A file is read by :func:`~finetune.data.images.load_image`, and an image over Pillow's
    warning limit for decompression bombs (``Image.MAX_IMAGE_PIXELS``, ~89 million pixels) is
    refused like one over its error limit (twice that), as fit's scan refuses both: such a
    "photo" would take gigabytes to decode.

    Raises:
        UnreadableImage: The input is not a usable image (unreadable, truncated, empty, not an
            image whatever its name, a decompression bomb, a folder or a FIFO), with why.
        DataError: An array of the wrong shape or type (a caller's mistake, never skipped).
    """
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(
                f"An array image must be uint8 (H, W, 3) RGB or (H, W) grey; got "
                f"{image.dtype} {image.shape}."
            )
        return image
    try:
        if isinstance(image, Image.Image):
            return pil_to_rgb(image)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return load_image(image)
    except _UNREADABLE as exc:
        raise UnreadableImage(image, _reason(image, exc)) from exc


def _reason(image: ImageInput, exc: BaseException) -> str:
    """Why ``image`` could not be decoded (``exc``, one of ``_UNREADABLE``), in the words of
    ``finetune check``."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {exc}"
    if isinstance(exc, UnidentifiedImageError):
        path = Path(image) if isinstance(image, (str, Path)) else None
        if path is not None and _size(path) == 0:
            return "empty file (0 bytes)"
        if isinstance(exc.__cause__, UnidentifiedImageError):  # load_image names the format
            return str(exc).removeprefix(f"{path}: ")
        return "not an image (Pillow does not recognise its content)"
    if isinstance(exc, OSError) and exc.errno is not None:  # gone, no permission...
        return f"cannot be read ({exc.strerror or exc})"
    # load_image's own refusals (a folder, a FIFO, over the size limit) and damaged images
    return f"not a usable image ({exc})"


def _size(path: Path) -> int:
    """The file's size in bytes; -1 when it cannot be looked at."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def unreadable_files(report: ScanReport) -> list[Skipped]:
    """The image files a scan left out because they are not usable images (unreadable,
    truncated, empty, not an image, a decompression bomb, not a regular file), with the scan's
    reasons: what ``check``, ``augment-preview`` and ``fit`` skipped of the images.

    The scan passes over other entries too, which are no image to read and not counted here:
    hidden files, files without an image suffix (``notes.txt``), a folder without images, and
    an image beside the class folders (told apart by checking the file again, as the scan
    did: only image-named files it listed are, so this costs a few decodes at most).
    """
    return [
        Skipped(str(path), reason)
        for path, reason in report.skipped
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and not path.is_dir()
        and not check_file(path).ok
    ]
