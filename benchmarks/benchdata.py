"""Real image datasets for the benchmarks, written as folder-per-class trees (train/val/test).

- ``fashion-small``: Fashion-MNIST, 40 train / 10 val per class (the shipped sample data's size)
- ``fashion-large``: Fashion-MNIST, 500 train / 100 val per class
- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images), 60/20/20 split
- ``fashion-edges``: Fashion-MNIST, 40 train / 20 val per class, each item small and touching
  a random side of its frame (signal at the edges, where corner crops cut it)
- ``digit-parity``: digits 0-3 as even/odd, ~290 training images per class ("a lot": auto
  fine-tunes), 60/20/20
- ``photos``: crops of real photos shipped with scikit-image and scikit-learn; the class is the
  photo a crop comes from (natural images, close to ImageNet's)
- :func:`photo_files`: the same photos as camera-sized JPEG files (for decoding speed)

Test sets: 100 per class from Fashion-MNIST's own test file, 20% of digits, 30 crops per photo.
Fashion-MNIST needs Debian's ``dataset-fashion-mnist`` package (MIT licence).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# The Fashion-MNIST reader and class names are the sample data's (sample_data/build_fashion.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_data"))
from build_fashion import CLASSES as FASHION_CLASSES
from build_fashion import SOURCE as FASHION
from build_fashion import read_idx


def _write(root: Path, split: str, name: str, index: int, array: np.ndarray) -> None:
    folder = root / split / name
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / f"{index:05d}.png")


def fashion(
    root: Path,
    train: int,
    val: int,
    test: int = 100,
    image: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Path:
    """The first ``train`` + ``val`` images of each class of Fashion-MNIST's training file and
    the first ``test`` of its test file, each passed through ``image`` when given."""
    if (root / "train").is_dir():
        return root
    x = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    tx = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    ty = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    made = image or (lambda array: array)
    for label, name in enumerate(FASHION_CLASSES):
        idx = np.flatnonzero(y == label)
        for i in idx[:train]:
            _write(root, "train", name, i, made(x[i]))
        for i in idx[train : train + val]:
            _write(root, "val", name, i, made(x[i]))
        for i in np.flatnonzero(ty == label)[:test]:
            _write(root, "test", name, i, made(tx[i]))
    return root


def fashion_edges(root: Path, train: int = 40, val: int = 20, test: int = 50) -> Path:
    """Fashion-MNIST items whose signal sits at the image's edge: each item, shrunk to 20 px,
    touches a random side of a black 48 px frame at a random place along it, as a defect near
    the border of an inspection photo does. Crops that cut the border cut the item."""
    rng = np.random.default_rng(0)

    def framed(item: np.ndarray) -> np.ndarray:
        small = np.asarray(Image.fromarray(item).resize((20, 20), Image.BILINEAR))
        frame = np.zeros((48, 48), dtype=np.uint8)
        along = int(rng.integers(0, 48 - 20 + 1))
        side = int(rng.integers(4))
        top, left = [(0, along), (28, along), (along, 0), (along, 28)][side]
        frame[top : top + 20, left : left + 20] = small
        return frame

    return fashion(root, train, val, test, image=framed)


def digits(root: Path) -> Path:
    if (root / "train").is_dir():
        return root
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0 * 255).round().astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    n = len(order)
    for rank, i in enumerate(order):
        split = "train" if rank < 0.6 * n else "val" if rank < 0.8 * n else "test"
        _write(root, split, str(data.target[i]), i, images[i])
    return root


def digit_parity(root: Path) -> Path:
    """scikit-learn's digits 0-3 as two classes, even and odd: about 290 training images per
    class, "a lot of data" for auto, in 8 px images that fine-tune fast on a CPU; 60/20/20."""
    if (root / "train").is_dir():
        return root
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0 * 255).round().astype(np.uint8)
    chosen = np.flatnonzero(data.target <= 3)
    order = np.random.default_rng(0).permutation(chosen)
    n = len(order)
    for rank, i in enumerate(order):
        split = "train" if rank < 0.6 * n else "val" if rank < 0.8 * n else "test"
        _write(root, split, "even" if data.target[i] % 2 == 0 else "odd", i, images[i])
    return root


def photo_sources() -> dict[str, Path]:
    """The real photos shipped with scikit-image and scikit-learn, by class name."""
    import skimage
    import sklearn

    sk = Path(skimage.__file__).parent / "data"
    sl = Path(sklearn.__file__).parent / "datasets" / "images"
    return {
        "astronaut": sk / "astronaut.png",
        "cat": sk / "chelsea.png",
        "coffee": sk / "coffee.png",
        "rocket": sk / "rocket.jpg",
        "motorcycle": sk / "motorcycle_left.png",
        "palace": sl / "china.jpg",
        "flower": sl / "flower.jpg",
    }


def photos(root: Path, per_class: tuple[int, int, int] = (30, 15, 30), size: int = 96) -> Path:
    if (root / "train").is_dir():
        return root
    sources = photo_sources()
    rng = np.random.default_rng(0)
    for name, path in sources.items():
        image = Image.open(path).convert("RGB")
        w, h = image.size
        count = 0
        for split, n in zip(("train", "val", "test"), per_class, strict=True):
            for _ in range(n):
                side = int(rng.uniform(0.2, 0.5) * min(w, h))
                x0, y0 = rng.integers(0, w - side), rng.integers(0, h - side)
                crop = image.crop((x0, y0, x0 + side, y0 + side)).resize((size, size))
                _write(root, split, name, count, np.asarray(crop))
                count += 1
    return root


def photo_files(root: Path, per_class: tuple[int, int], width: int, height: int) -> Path:
    """Camera-sized JPEGs (quality 90) made from the same real photos: random 4:3 crops of
    60-100% of a photo, resized to ``width`` x ``height`` with mild sensor-like noise (sigma 3)
    so that they compress, and decode, like photographs rather than like smooth upscales."""
    if (root / "train").is_dir():
        return root
    sources = photo_sources()
    rng = np.random.default_rng(0)
    for name, path in sources.items():
        image = Image.open(path).convert("RGB")
        w, h = image.size
        count = 0
        for split, n in zip(("train", "val"), per_class, strict=True):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                cw = int(rng.uniform(0.6, 1.0) * min(w, h * 4 / 3))
                ch = cw * 3 // 4
                x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
                crop = image.crop((x0, y0, x0 + cw, y0 + ch)).resize((width, height), Image.BICUBIC)
                noisy = np.asarray(crop, dtype=np.float32) + rng.normal(0, 3, (height, width, 3))
                pixels = np.clip(noisy, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{count:05d}.jpg", quality=90)
                count += 1
    return root


def build(base: Path) -> dict[str, Path]:
    """Materialise every dataset under ``base`` (skipping those already there)."""
    return {
        "fashion-small": fashion(base / "fashion-small", 40, 10),
        "fashion-large": fashion(base / "fashion-large", 500, 100),
        "digits": digits(base / "digits"),
        "photos": photos(base / "photos"),
        "fashion-edges": fashion_edges(base / "fashion-edges"),
        "digit-parity": digit_parity(base / "digit-parity"),
    }


if __name__ == "__main__":
    for name, path in build(Path("benchmarks/data")).items():
        print(name, path)
