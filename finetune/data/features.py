"""Frozen features: run the backbone once over the data, pool every stage, cache the result.

Strategies that keep the backbone frozen (``linear``, ``stage-probe``) need each image's features
only once. :func:`extract_features` computes, in one forward pass per batch, the globally
average-pooled output of every stage (``forward_intermediates``) and the pre-logits features of
the full backbone (``"head"``). Results are cached in memory and on disk (safetensors, no pickle)
under a key made of the backbone's weights, the preprocessing and the files (path, size,
modification and change time, inode, and the content's SHA-1 from the scan), so a second run on
the same data reuses them and a file rewritten in place (even with its mtime restored) does not.
A cache file that does not hold what was asked for (a point missing, arrays of the wrong shape
or type) is recomputed, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune.data.caches import cache_root
from finetune.data.loaders import ImageDataset, collate_skipping_failed, prepare_for_workers
from finetune.data.scan import Sample
from finetune.data.transforms import DeviceNormalize, Preprocessing, eval_transform
from finetune.files import atomic_write

__all__ = ["HEAD", "cache_dir", "extract_features", "probe_points", "weights_fingerprint"]

HEAD = "head"  # the probe point after the whole backbone (what `linear` uses)
_MEMORY: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
_MEMORY_ENTRIES = 8


def cache_dir() -> Path:
    """Where feature caches live: ``features/`` under :func:`finetune.data.caches.cache_root`."""
    return cache_root() / "features"


def probe_points(backbone: nn.Module) -> list[str]:
    """Names of the points features can be taken from: ``stage0``... then ``head``."""
    stages = len(getattr(backbone, "feature_info", []) or [])
    has_intermediates = hasattr(backbone, "forward_intermediates") and stages > 0
    return [*(f"stage{i}" for i in range(stages if has_intermediates else 0)), HEAD]


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of every tensor in ``module``'s state_dict (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _cache_key(
    fingerprint: str, pre: Preprocessing, samples: Sequence[Sample], points: Sequence[str]
) -> str:
    files = []
    for s in samples:
        try:
            info = s.path.stat()
            seen = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_dev, info.st_ino]
        except OSError:  # gone since the scan: left out by the loader, with a warning
            seen = None
        files.append([str(s.path.absolute()), seen, s.digest, s.label])
    blob = json.dumps([2, fingerprint, pre.to_dict(), list(points), files], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _usable(features: dict[str, np.ndarray], points: Sequence[str], samples: int) -> bool:
    """Whether a cache file holds what :func:`_compute` returns for ``points`` over
    ``samples`` images: every point a (N, D) float array and "label" N integers, N <= samples."""
    labels = features.get("label")
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
        return False
    n = len(labels)
    if n > samples:
        return False
    for point in points:
        array = features.get(point)
        if array is None or array.ndim != 2 or array.shape[0] != n or array.dtype.kind != "f":
            return False
    return True


@torch.inference_mode()
def _compute(
    backbone: nn.Module,
    samples: Sequence[Sample],
    pre: Preprocessing,
    points: Sequence[str],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
    channels_last: bool,
) -> dict[str, np.ndarray]:
    backbone.eval()
    prepare_for_workers(num_workers)
    loader = DataLoader(
        ImageDataset(samples, eval_transform(pre, normalize=False)),  # uint8: a quarter the bytes
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skipping_failed,
        pin_memory=device.type == "cuda",
    )
    normalize = DeviceNormalize.of(pre)
    stage_ids = [int(p.removeprefix("stage")) for p in points if p != HEAD]
    chunks: dict[str, list[np.ndarray]] = {p: [] for p in (*points, "label")}
    for batch in tqdm(
        loader, desc=desc, unit="batch", leave=False, disable=None if progress else True
    ):
        if batch is None:
            continue
        images, labels = batch
        images = normalize(images.to(device, non_blocking=True))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if stage_ids:
            final, stages = backbone.forward_intermediates(images, indices=stage_ids)
            for i, feature in zip(stage_ids, stages, strict=True):
                chunks[f"stage{i}"].append(feature.float().mean((2, 3)).cpu().numpy())
        else:
            final = backbone.forward_features(images)
        if HEAD in points:
            chunks[HEAD].append(backbone.forward_head(final, pre_logits=True).float().cpu().numpy())
        chunks["label"].append(labels.numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}


def extract_features(
    backbone: nn.Module,
    samples: Sequence[Sample],
    pre: Preprocessing,
    points: Sequence[str],
    *,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 0,
    cache: bool = True,
    progress: bool = True,
    desc: str = "features",
    channels_last: bool = False,
) -> tuple[dict[str, np.ndarray], bool]:
    """Pooled features of ``samples`` at each probe point, and whether they came from a cache.

    Args:
        channels_last: Feed the images NHWC (convert ``backbone`` to channels_last first).

    Returns:
        ``({point: (N, D) float32 array, ..., "label": (N,) int array}, cached)``. Images that
        fail to decode are left out (with a warning), so N can be smaller than ``len(samples)``.
    """
    key = _cache_key(weights_fingerprint(backbone), pre, samples, points) if cache else ""
    if cache and key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key], True
    file = cache_dir() / f"{key}.safetensors"
    if cache and file.is_file():
        try:
            features = load_file(str(file))
        except Exception:  # a damaged cache file is recomputed, never trusted
            features = {}
        if _usable(features, points, len(samples)):
            _remember(key, features)
            return features, True
        with contextlib.suppress(OSError):
            file.unlink(missing_ok=True)
    features = _compute(
        backbone, samples, pre, points, device, batch_size, num_workers, progress, desc,
        channels_last,
    )  # fmt: skip
    if cache:
        _remember(key, features)
        # A read-only or full disk only costs the next run the recomputation. Not fsynced: a
        # damaged file fails to load and is recomputed (above).
        with contextlib.suppress(OSError):
            atomic_write(file, save(features), durable=False)
    return features, False


def _remember(key: str, features: dict[str, np.ndarray]) -> None:
    _MEMORY[key] = features
    _MEMORY.move_to_end(key)
    while len(_MEMORY) > _MEMORY_ENTRIES:
        _MEMORY.popitem(last=False)
