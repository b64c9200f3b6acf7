"""Rebuild ``sample_data/fashion`` from Debian's ``dataset-fashion-mnist`` package.

Fashion-MNIST (c) 2017 Zalando SE, MIT licence (see sample_data/README.md). Run:

    apt-get install dataset-fashion-mnist
    python sample_data/build_fashion.py

It writes 40 train, 10 val and 10 test greyscale 28x28 PNGs per class, the first ones of each
class in the original files, so the output is the same on every machine.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
TARGET = Path(__file__).resolve().parent / "fashion"
# Fashion-MNIST's label order; folder names are lower-case and shell-friendly.
CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
PER_CLASS = {"train": 40, "val": 10, "test": 10}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main() -> None:
    train_x = read_idx(SOURCE / "train-images-idx3-ubyte.gz")
    train_y = read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(SOURCE / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz")
    if TARGET.exists():
        shutil.rmtree(TARGET)
    for label, name in enumerate(CLASSES):
        train_idx = np.flatnonzero(train_y == label)
        test_idx = np.flatnonzero(test_y == label)
        picks = {
            "train": (train_x, train_idx[: PER_CLASS["train"]]),
            "val": (train_x, train_idx[PER_CLASS["train"] : PER_CLASS["train"] + PER_CLASS["val"]]),
            "test": (test_x, test_idx[: PER_CLASS["test"]]),
        }
        for split, (images, indices) in picks.items():
            folder = TARGET / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices:
                Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png", optimize=True)


if __name__ == "__main__":
    main()
