"""Decode once: training images kept decoded, resized and memory-mapped between epochs and runs.

Decoding a JPEG or PNG and resizing it costs the same every epoch, and for large photos it costs
more than the model does on a small CPU. :class:`DecodedCache` stores each image once as a
``uint8`` array whose short side is at most the evaluation resize side (``input_size /
crop_pct``: a bit above the training size), in a ``.npy`` file named by the SHA-1 of the file's
content (which scanning already computed) under ``decoded/`` in
:func:`finetune.data.caches.cache_root`.
Later epochs and later runs memory-map the array instead of decoding; augmentation runs on it.

- Evaluation is unchanged, bit for bit: the eval transform's resize of a cached array is the
  identity, and the array is what that resize made of the decoded file.
- Training crops come from the resized array instead of the full-resolution file: the same
  crop fractions, at most ``1 / crop_pct`` (~1.14x) more pixels than the model sees.
- Images smaller than the resize side are stored as decoded, never upscaled.
- Writes are atomic (a temporary file, then a rename), so processes and DataLoader workers can
  share the cache; a read-only or full disk only means decoding again.
- A cached file that is not what would be stored (unreadable, not a ``uint8`` (H, W, 3) array,
  or of another size than the scan's width and height give) is decoded again, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from finetune.data.caches import cache_root
from finetune.data.images import load_image, read_image_bytes
from finetune.data.scan import Sample
from finetune.data.transforms import Preprocessing, resize_side
from finetune.files import atomic_write

__all__ = ["CacheFill", "DecodedCache", "describe_size", "estimate_bytes"]

_VERSION = 1  # bump when what is stored changes (decoding, resizing), to start a new cache


def _stored_shape(width: int, height: int, side: int) -> tuple[int, int]:
    """(height, width) of an image once its short side is brought down to ``side``."""
    short = min(width, height)
    if short <= side:
        return height, width
    scale = side / short
    return round(height * scale), round(width * scale)


def estimate_bytes(samples: Sequence[Sample], side: int) -> int:
    """Disk space the cached arrays of ``samples`` take (their sizes come from the scan)."""
    total = 0
    for s in samples:
        h, w = _stored_shape(s.width, s.height, side)
        total += h * w * 3 + 128  # + the .npy header
    return total


@dataclass(frozen=True)
class CacheFill:
    """What :meth:`DecodedCache.fill` did."""

    images: int  # images in the cache for this data after the fill
    added: int  # of which decoded now
    failed: int  # images that could not be decoded (training skips them, with a warning)
    bytes: int  # disk space of this data's arrays
    seconds: float
    folder: Path

    def describe(self) -> str:
        reused = self.images - self.added
        return (
            f"{self.images:,} decoded images, {describe_size(self.bytes)} in {self.folder} "
            f"({self.added:,} decoded now in {self.seconds:.1f} s, {reused:,} reused)"
            + (f", {self.failed} failed" if self.failed else "")
        )


class DecodedCache:
    """Decoded images resized to a short side of at most ``side`` pixels, one memory-mapped
    ``.npy`` file per image content.

    Args:
        side: The short side images are brought down to (the eval resize side).
        interpolation: The OpenCV interpolation flag of that resize (the model's).
        root: The cache folder; defaults to ``decoded/`` under
            :func:`finetune.data.caches.cache_root`.
    """

    def __init__(self, side: int, interpolation: int, root: Path | None = None) -> None:
        self.side = side
        self.interpolation = interpolation
        self.root = root or cache_root() / "decoded"
        self.folder = self.root / f"v{_VERSION}-side{side}-interp{interpolation}"
        self._resize = A.SmallestMaxSize(max_size=side, interpolation=interpolation)

    @classmethod
    def for_preprocessing(cls, pre: Preprocessing, root: Path | None = None) -> DecodedCache:
        """The cache whose arrays the evaluation transform of ``pre`` leaves as they are."""
        return cls(resize_side(pre), pre.cv2_interpolation, root)

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.npy"

    def load(self, sample: Sample) -> np.ndarray:
        """The image of ``sample`` as an RGB ``uint8`` (H, W, 3) array: memory-mapped from the
        cache, else decoded, resized and stored for next time.

        Raises:
            OSError, ValueError, PIL.Image.DecompressionBombError: The file cannot be decoded
                (as :func:`finetune.data.images.load_image`).
        """
        digest = sample.digest or _digest(sample.path)
        file = self.path(digest)
        cached = self._cached(file, sample)
        if cached is not None:
            return cached
        image = self.resized(load_image(sample.path))
        self._store(file, image)
        return image

    def _cached(self, file: Path, sample: Sample) -> np.ndarray | None:
        """The array stored in ``file`` when it is one this cache would store for ``sample``;
        None when it is missing or damaged (then the file is decoded again and overwrites it)."""
        try:
            array = np.load(file, mmap_mode="c")  # copy-on-write: augmentation may write
        except (OSError, ValueError, EOFError):  # not cached yet, or not a .npy file
            return None
        if not (
            isinstance(array, np.ndarray)
            and array.dtype == np.uint8
            and array.ndim == 3
            and array.shape[2] == 3
            and min(array.shape[:2]) > 0
        ):
            return None
        if sample.width and sample.height:  # from the scan: the stored size is known
            want = _stored_shape(sample.width, sample.height, self.side)
            got = array.shape[:2]
            # Either way round (EXIF orientation turns the image); +-1 for the resize's rounding.
            near = [
                all(abs(g - w) <= 1 for g, w in zip(got, o, strict=True))
                for o in (want, want[::-1])
            ]
            if not any(near):
                return None
        elif min(array.shape[:2]) > self.side:  # stored arrays are never above the side
            return None
        return array

    def resized(self, image: np.ndarray) -> np.ndarray:
        """``image`` with its short side brought down to :attr:`side` (never enlarged)."""
        if min(image.shape[:2]) <= self.side:
            return image
        return self._resize(image=image)["image"]

    def _store(self, file: Path, image: np.ndarray) -> None:
        # Not fsynced (an fsync per image would slow filling down): a file damaged by a power
        # cut fails to load and is decoded again. Racing writers: the last rename wins, whole.
        # A read-only or full disk: decoding again next time is the only cost.
        with contextlib.suppress(OSError):
            atomic_write(file, lambda f: np.save(f, np.ascontiguousarray(image)), durable=False)

    def fill(self, samples: Sequence[Sample], progress: bool = False) -> CacheFill:
        """Decode and store every image of ``samples`` not cached yet, in parallel threads
        (decoding and resizing release the GIL)."""
        start = time.perf_counter()
        unique: dict[str, Sample] = {}
        for s in samples:
            with contextlib.suppress(OSError):  # a file gone since the scan: the loader warns
                unique.setdefault(s.digest or _digest(s.path), s)
        # Identical files are one entry: decoded once, counted once (the summary said "-1 reused").
        todo = [s for d, s in unique.items() if self._cached(self.path(d), s) is None]
        failed = 0
        workers = max(1, min(16, os.cpu_count() or 1))

        def decode(sample: Sample) -> bool:
            try:
                self.load(sample)
            except (OSError, ValueError, Image.DecompressionBombError):
                return False
            return True

        with ThreadPoolExecutor(workers) as pool:
            done = pool.map(decode, todo)
            bar = tqdm(done, total=len(todo), desc="decoding images", unit="img", leave=False,
                       disable=None if progress and todo else True)  # fmt: skip
            failed = sum(not ok for ok in bar)
        return CacheFill(
            images=len(unique) - failed,
            added=len(todo) - failed,
            failed=failed,
            bytes=sum(_size(self.path(d)) for d in unique),
            seconds=time.perf_counter() - start,
            folder=self.folder,
        )


def _digest(path: Path) -> str:
    """SHA-1 of a file's content, as the scan computes it (for samples made without a scan)."""
    return hashlib.sha1(read_image_bytes(path), usedforsecurity=False).hexdigest()


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0


def describe_size(nbytes: int) -> str:
    """A size for people: MB below a gigabyte, else GB."""
    if nbytes < 1024**3:
        return f"{nbytes / 1024**2:,.0f} MB"
    return f"{nbytes / 1024**3:,.1f} GB"
