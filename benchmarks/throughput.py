"""Training throughput: our ``fit`` loop against the model alone and a plain torchvision loop.

For each case (a dataset of real images and a training size), side by side in one run, with the
same model, image size, batch size, optimizer (AdamW), memory layout (channels_last, fit's
default), threads, workers and device:

- (a) ``model only``: forward + backward + step on random tensors already in memory: the
  ceiling for any input pipeline (measured just before and just after (b); their mean);
- (b) ``fit, cache``: ``finetune fit --strategy finetune-all --augment default`` with the
  decoded-image cache warm (filled beforehand; the cold fill is timed on its own line);
- (b') ``fit, no cache``: the same with ``--no-cache-images``: every epoch decodes every file;
- (c) ``torchvision``: ``ImageFolder`` + ``RandomResizedCrop`` + flip + ``ToTensor`` +
  ``Normalize`` in a ``DataLoader``, the same model and optimizer.
- (a') ``model only, malloc default``: (a) in a fresh process with glibc's default allocator
  settings, where every other row runs with ``finetune.training.compute.keep_freed_memory`` (which
  ``fit`` applies on a CPU): what that setting alone does to the ceiling.

(b) and (b') are training images per second of an epoch's wall time from metrics.csv, which
includes that epoch's validation pass (2 images per class): slightly pessimistic. (b), (b') and
(c) take the median of epochs 2-4; (a) the median of its steps after 3 of warm-up. Our
augmentation also does more than (c)'s (colour jitter, PCA lighting).

Cases (``--cases``; all by default):

- ``fashion@64``: Fashion-MNIST, 28 px PNGs (cheap to decode; 50 train, 2 val per class), at 64 px;
- ``photos-1600x1200@128``: 1600x1200 JPEG photos (``benchdata.photo_files``) at 128 px;
- ``photos-4032x3024@224``: 12-megapixel JPEG photos, a phone camera's, at 224 px.

    apt-get install dataset-fashion-mnist     # for the fashion case
    python benchmarks/throughput.py [--cases fashion@64 ...] [--batch-size 32] [--workers 0]

Prints images/s, the ratios (b)/(a) and (b)/(c), and this process's peak resident memory.
Issue 8 asks for (b)/(a) >= 0.85 and (b)/(c) >= 1.5 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from benchdata import fashion, photo_files  # benchmarks/benchdata.py

import finetune
from finetune.data.decoded import DecodedCache
from finetune.data.images import load_image
from finetune.data.scan import scan_folder
from finetune.data.transforms import Preprocessing
from finetune.model.backbone import create_backbone, create_classifier
from finetune.training.compute import keep_freed_memory
from finetune.training.loop import read_metrics

NHWC = torch.channels_last  # as fit trains by default (--channels-last), for all three
EPOCHS = 4  # (b), (b') and (c): the median epoch of epochs 2-4
CASES = ("fashion@64", "photos-1600x1200@128", "photos-4032x3024@224")


def dataset(case: str, base: Path) -> tuple[Path, int]:
    """The folder (train/ and val/) of a case and its training image size."""
    name, size = case.split("@")
    if name == "fashion":
        return fashion(base / "fashion-50-2", 50, 2), int(size)
    width, height = (int(v) for v in name.removeprefix("photos-").split("x"))
    return photo_files(base / f"photos-{width}x{height}-40", (40, 2), width, height), int(size)


def model_only(model_name: str, size: int, batch: int, seconds: float = 20.0) -> float:
    model = create_classifier(create_backbone(model_name), 10).train().to(memory_format=NHWC)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size).to(memory_format=NHWC)
    y = torch.randint(0, 10, (batch,))
    times: list[float] = []
    while len(times) < 30 and (len(times) < 8 or sum(times) < seconds):
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[3:])  # the median step after 3 of warm-up


def model_only_default_malloc(model_name: str, size: int, batch: int) -> float:
    """(a) in a child process that never calls keep_freed_memory."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from throughput import model_only; "
        "print(model_only(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))"
    )
    here = str(Path(__file__).resolve().parent)
    child = subprocess.run(
        [sys.executable, "-c", code, here, model_name, str(size), str(batch)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(child.stdout.split()[-1])


def ours(root: Path, size: int, args: argparse.Namespace, out: Path, cache: bool) -> float:
    run = finetune.fit(
        root, strategy="finetune-all", epochs=EPOCHS, image_size=size, batch_size=args.batch_size,
        augment="default", num_workers=args.workers, device="cpu", cache_images=cache,
        out=str(out), verbose=False, report=False,
    )  # fmt: skip
    later = read_metrics(run.dir / "metrics.csv")[1:]  # after the first epoch's start-up
    images = len(scan_folder(root).train) // args.batch_size * args.batch_size
    return images / statistics.median(r.seconds for r in later)


def plain_torchvision(root: Path, size: int, args: argparse.Namespace) -> float:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])  # fmt: skip
    data = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
    )
    model = create_classifier(create_backbone(args.model), len(data.classes)).train()
    model.to(memory_format=NHWC)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rates = []
    for _ in range(EPOCHS):  # the median of the epochs after the first, as for ours
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x.to(memory_format=NHWC)), y).backward()
            optimizer.step()
            seen += len(y)
        rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def decoding(root: Path, cache: DecodedCache) -> tuple[float, float, float]:
    """Milliseconds per image: decode the file, decode and resize it, read the cached array."""
    samples = scan_folder(root).train[:20]
    times = []
    for read in (
        lambda s: load_image(s.path),
        lambda s: cache.resized(load_image(s.path)),
        lambda s: np.array(cache.load(s)),
    ):
        start = time.perf_counter()
        for s in samples:
            read(s)
        times.append((time.perf_counter() - start) / len(samples) * 1000)
    return times[0], times[1], times[2]


def run_case(case: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    root, size = dataset(case, args.data)
    samples = scan_folder(root)
    pre = Preprocessing.from_model(create_backbone(args.model), size)
    cache = DecodedCache.for_preprocessing(pre)  # under FINETUNE_CACHE_DIR: empty at first
    cold = cache.fill([*samples.train, *samples.val])
    decode_ms, resize_ms, cached_ms = decoding(root, cache)
    first = samples.train[0]
    print(
        f"\n== {case}: {len(samples.train)} training images of {first.width}x{first.height} px "
        f"({first.path.suffix}), trained at {size} px =="
    )
    print(
        f"per image: decode {decode_ms:.1f} ms, decode + resize to {cache.side} px "
        f"{resize_ms:.1f} ms, cached array {cached_ms:.2f} ms"
    )
    print(f"cold fill of the cache: {cold.added} images in {cold.seconds:.1f} s "
          f"({cold.added / max(cold.seconds, 1e-9):.1f} img/s)")  # fmt: skip
    default_malloc = model_only_default_malloc(args.model, size, args.batch_size)
    # The ceiling is measured right before and right after (b), and (a) is their mean: on a
    # shared machine the speed drifts by 10-20% within minutes, and (b)/(a) should compare
    # the two at the same time.
    before = model_only(args.model, size, args.batch_size)
    cached = ours(root, size, args, tmp / f"{case}-cache", cache=True)
    after = model_only(args.model, size, args.batch_size)
    rates = {
        "(a) model only": (before + after) / 2,
        "(b) fit, cache": cached,
        "(b') fit, no cache": ours(root, size, args, tmp / f"{case}-plain", cache=False),
        "(c) torchvision": plain_torchvision(root, size, args),
    }
    for name, rate in rates.items():
        print(f"{name:<20} {rate:8.1f} img/s")
    print(f"    (a) before and after (b): {before:.1f} and {after:.1f} img/s")
    print(f"(a') model only, malloc default {default_malloc:8.1f} img/s "
          f"((a)/(a') {rates['(a) model only'] / default_malloc:.2f})")  # fmt: skip
    a, b, plain, c = rates.values()
    print(f"(b)/(a) {b / a:.2f}   (b)/(c) {b / c:.2f}   (b')/(c) {plain / c:.2f}")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), help=", ".join(CASES))
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    keep_freed_memory()  # as fit does on a CPU: every row but (a') runs with it
    print(
        f"{args.model}, batch {args.batch_size}, {args.workers} workers, cpu "
        f"({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_CACHE_DIR"] = str(Path(tmp) / "cache")  # a cold cache to start
        for case in args.cases:
            run_case(case, args, Path(tmp))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
