"""Samples -> batches: the Dataset that decodes and transforms, DataLoader worker set-up, and
the collation that drops images that failed to decode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import cv2
import torch
from PIL import Image

from finetune.data.images import load_image
from finetune.data.scan import Sample
from finetune.errors import DataError

if TYPE_CHECKING:
    from finetune.data.decoded import DecodedCache


from finetune.data.decoded import DecodedCache

__all__ = ["ImageDataset", "collate_skipping_failed"]


class ImageDataset(torch.utils.data.Dataset):
    """Decodes samples (or reads them from a :class:`~finetune.data.decoded.DecodedCache`) and
    applies an albumentations transform; a failed decode yields ``None``."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[..., dict] | None = None,
        cache: DecodedCache | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        sample = self.samples[index]
        try:
            image = self.cache.load(sample) if self.cache else load_image(sample.path)
        except FileNotFoundError:  # deleted (or renamed) since the scan
            warnings.warn(f"Skipping {sample.path}: the file is gone since the scan", stacklevel=2)
            return None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            warnings.warn(f"Skipping {sample.path}: cannot decode it ({exc})", stacklevel=2)
            return None
        if self.transform is not None:
            try:
                image = self.transform(image=image)["image"]
            except Exception as exc:  # in a DataLoader worker the file would otherwise be lost
                raise DataError(
                    f"Preparing {sample.path} ({image.shape[1]}x{image.shape[0]} px) failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        return image, sample.label


def prepare_for_workers(num_workers: int) -> None:
    """Before a DataLoader forks ``num_workers`` worker processes: OpenCV runs one thread here,
    and the workers inherit it.

    A forked worker cannot set OpenCV's thread count itself: once this process has used
    OpenCV's thread pool (the decoded-cache fill, a resize in the main process), the call
    waits forever in the worker on the copied pool's condition variable, whose waiting
    threads were not copied. Setting it here stops this process's pool cleanly before the
    fork. One thread per worker is what the workers want (they run side by side on the
    cores); this process does no OpenCV work while workers load its batches.

    Without workers (the default on <= 2 cores) OpenCV keeps its default pool, one thread per
    core. PIL's one-thread decoding is most of the data time, so OpenCV's thread count makes no
    measurable difference to a training step (docs/speed.md), and one thread per worker costs
    nothing where workers need it.
    """
    if num_workers and cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def collate_skipping_failed(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Default collation without the images that failed to decode (``None`` entries)."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)
