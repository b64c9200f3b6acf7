"""Training throughput: our ``fit`` loop against the model alone and a plain torchvision loop.

Side by side in one run, same model, image size, batch size, optimizer (AdamW) and device:

- (a) ``model only``: forward + backward + step on random tensors already in memory, the
  ceiling for any input pipeline;
- (b) ``finetune fit``: ``finetune-all`` with the ``default`` augmentation on a real folder
  (Fashion-MNIST PNGs), training images per second of an epoch's wall time (the epoch's
  validation pass, 10 images per class, is included: the number is slightly pessimistic);
- (c) ``torchvision``: ``ImageFolder`` + ``RandomResizedCrop`` + flip + ``ToTensor`` +
  ``Normalize``, a ``DataLoader`` with the same workers, the same model and optimizer.

Prints images/s and the ratios (b)/(a) and (b)/(c), and the process's peak resident memory.

    python benchmarks/throughput.py [--image-size 64] [--batch-size 32] [--per-class 50]

Issue 8 asks for (b)/(a) >= 0.85 and (b)/(c) >= 1.5 on a 2-core CPU; this script measures
where we stand, it does not make it so.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from benchdata import fashion  # benchmarks/benchdata.py

import finetune
from finetune.models import create_backbone, create_classifier
from finetune.train import read_metrics


def model_only(args: argparse.Namespace, steps: int = 20) -> float:
    model = create_classifier(create_backbone(args.model), 10).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))
    for step in range(steps + 3):
        if step == 3:  # after warm-up
            start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return steps * args.batch_size / (time.perf_counter() - start)


def ours(root: Path, tmp: str, args: argparse.Namespace) -> float:
    run = finetune.fit(
        root, strategy="finetune-all", epochs=2, image_size=args.image_size,
        batch_size=args.batch_size, augment="default", num_workers=args.workers, device="cpu",
        out=f"{tmp}/ours", verbose=False, report=False,
    )  # fmt: skip
    last = read_metrics(run.dir / "metrics.csv")[-1]  # epoch 2: no first-epoch start-up
    steps = len(list((root / "train").rglob("*.png"))) // args.batch_size
    return steps * args.batch_size / last.seconds


def plain_torchvision(root: Path, args: argparse.Namespace) -> float:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])  # fmt: skip
    data = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
    )
    model = create_classifier(create_backbone(args.model), len(data.classes)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):  # time the second epoch, as for ours
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            seen += len(y)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=50, help="training images per class")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    root = fashion(args.data / f"fashion-{args.per_class}-10", args.per_class, 10)
    print(
        f"{args.model}, {args.image_size} px, batch {args.batch_size}, {args.workers} workers, "
        f"cpu ({torch.get_num_threads()} threads), Fashion-MNIST {args.per_class}/class"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rates = {
            "(a) model only": model_only(args),
            "(b) finetune fit": ours(root, tmp, args),
            "(c) torchvision": plain_torchvision(root, args),
        }
    for name, rate in rates.items():
        print(f"{name:<18} {rate:8.1f} img/s")
    ours_rate = rates["(b) finetune fit"]
    print(f"(b)/(a) {ours_rate / rates['(a) model only']:.2f}   "
          f"(b)/(c) {ours_rate / rates['(c) torchvision']:.2f}")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
