"""The training DataLoader with float32 batches (normalised in the workers, as before) against
uint8 batches normalised where the model runs (``DeviceNormalize``, what ``fit`` does now).

Both loaders are built alike (the decoded-image cache, the default augmentation with PCA
lighting, ``--workers`` worker processes, pinned memory on a GPU) and differ only in the
pipeline's last step. They are timed in turns in one run (A, B, A, B, ...: the machines are
noisy), each pass one epoch over 427x320 px JPEG crops of real photos (``gpu_check``'s data)
at 224 px, the batch moved to the device and normalised there. Prints images per second and
the ratio uint8 / float32.

    python benchmarks/loader_transport.py [--workers 2] [--images-per-class 100] [--device cpu]

Where a GPU was lent, ``benchmarks/gpu_check.py``'s "loader alone" row measures the uint8
loader at 16 cores (docs/speed.md has both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from gpu_check import Setup, build_photos  # benchmarks/gpu_check.py

from finetune.data.decoded import DecodedCache
from finetune.data.loaders import ImageDataset, collate_skipping_failed, prepare_for_workers
from finetune.data.scan import scan_folder
from finetune.data.transforms import (
    PRESETS,
    DeviceNormalize,
    Preprocessing,
    fit_lighting,
    train_transform,
)
from finetune.model.backbone import create_backbone
from finetune.strategies.loaders import PREFETCH_BATCHES


def loader(samples, pre, lighting, cache, args, normalize: bool) -> torch.utils.data.DataLoader:
    transform = train_transform(pre, PRESETS["default"], lighting, seed=0, normalize=normalize)
    return torch.utils.data.DataLoader(
        ImageDataset(samples, transform, cache),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        collate_fn=collate_skipping_failed,
        pin_memory=args.device.startswith("cuda"),
        persistent_workers=args.workers > 0,
        prefetch_factor=PREFETCH_BATCHES if args.workers else None,
    )


def epoch_rate(data, device: torch.device, normalize: DeviceNormalize) -> float:
    start, seen = time.perf_counter(), 0
    for images, _ in data:
        x = normalize(images.to(device, non_blocking=True, memory_format=torch.channels_last))
        seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_CACHE_DIR"] = str(Path(tmp) / "cache")
        setup = Setup(args.device, 224, args.batch_size, args.images_per_class, 2, 1, 320)
        split = scan_folder(build_photos(Path(tmp) / "photos", setup))
        pre = Preprocessing.from_model(create_backbone("tf_efficientnet_lite0"), 224)
        cache = DecodedCache.for_preprocessing(pre)
        cache.fill(split.train)
        lighting = fit_lighting([s.path for s in split.train], seed=0)
        normalize = DeviceNormalize.of(pre)
        prepare_for_workers(args.workers)
        loaders = {
            "float32 (normalised in the workers)": loader(
                split.train, pre, lighting, cache, args, normalize=True
            ),
            "uint8 (normalised on the device)": loader(
                split.train, pre, lighting, cache, args, normalize=False
            ),
        }
        for data in loaders.values():  # the workers start; the first pass is not timed
            epoch_rate(data, device, normalize)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, data in loaders.items():
                rates[name].append(epoch_rate(data, device, normalize))
    print(
        f"{len(split.train)} training images at 224 px, batch {args.batch_size}, "
        f"{args.workers} workers, {args.device}, {os.cpu_count()} cores; median of "
        f"{args.rounds} epochs each, in turns"
    )
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in medians.items():
        runs = ", ".join(f"{r:.0f}" for r in rates[name])
        print(f"{name:<38} {rate:8.0f} img/s   ({runs})")
    old, new = medians.values()
    print(f"uint8 / float32: {new / old:.2f}x")


if __name__ == "__main__":
    main()
