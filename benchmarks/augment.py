"""Training input pipeline speed per CPU core: finetune's against torchvision.transforms.v2.

Images per second of decode + augment + normalise + to-tensor: finetune's (PIL decode to a numpy
array, then the albumentations pipeline of ``train_transform``) against the same pipeline written
with torchvision's ``transforms.v2`` (PIL decode, then PIL or tensor ops), side by side on the
same images, same output size, in one run.

    python benchmarks/augment.py [--repeats 3] [--images 200] [--workers 2]

Everything runs in this one process with ``torch.set_num_threads(1)`` and
``cv2.setNumThreads(1)`` (PIL and numpy are single-threaded here), so a number is images/s on
one core; the ``2-worker loader`` row is the exception: a ``DataLoader`` with two worker
processes (one thread each), batches of 32, whole-machine images/s (``--workers 0`` skips it).

Data (real images, ``--images`` of each):
- ``fashion``: Fashion-MNIST PNGs from sample_data/fashion/train (28x28 greyscale), out 64 px.
- ``photos``: 500x375 JPEGs (quality 90) cut from the scikit-image / scikit-learn sample photos
  (chelsea, coffee, astronaut, rocket, china, flower; a random 4:3 window of 60-100% of the
  largest one that fits, resized; chelsea is 451x300, so its windows are upsampled), out 224 px.

Pipelines, for tf_efficientnet_lite0's preprocessing (mean = std = 0.5, bicubic) and each preset:
- ours: ``finetune.data.images.load_image`` + ``train_transform(pre, PRESETS[preset], lighting)``:
  RandomResizedCrop (cv2 bicubic), HorizontalFlip, ColorJitter(p=jitter_p), PCALighting
  (on uint8), Normalize, ToTensorV2. Preset ``none``: SmallestMaxSize + CenterCrop instead.
- torchvision: ``Image.open(path).convert("RGB")`` + v2 RandomResizedCrop(bicubic,
  antialias=True), RandomHorizontalFlip, RandomApply([ColorJitter], p=jitter_p) on the PIL
  image, ToImage, ToDtype(float32, scale=True), PCA lighting on the 0-1 float tensor (a small
  torch callable, same eigenvectors/values and sigma, clamped to 0-1 as ours is), Normalize.
  Preset ``none``: Resize(short side) + CenterCrop. That is the ``tv pil`` column (the default
  of torchvision's reference recipes); ``tv tensor`` runs ToImage first and the crop, flip and
  jitter on the uint8 tensor instead (torch's resize is faster than PIL's, its jitter slower).
All three use the lighting PCA that ``fit_lighting`` measures on the dataset, and the outputs' shape
and dtype are checked to match. The work differs in one respect: torchvision's bicubic resize is
antialiased (PIL's always is) and cv2's is not, which spares torchvision aliasing where a crop
is shrunk (the photos); it is part, not most, of why its crop is slower (for 340 -> 224 px:
cv2 ~0.1 ms, torch uint8 with or without antialias ~0.35 ms, PIL ~1.3 ms).

Rows: ``decode`` (file -> RGB image only; ours includes the copy into a numpy array, which
torchvision leaves to ToImage), ``augment`` (on images decoded beforehand), ``decode+augment``
(the whole per-image work of a training loader), and the loader row. Each is the median of
``--repeats`` timed passes over all images (looped to last at least 0.2 s) after a warm-up; the
passes of the pipelines alternate, so a background load hits them alike. ``ours/...`` above 1
means ours is faster. After the table, the time per op of the ``default`` preset (augment only,
microseconds per image, median over the repeats; ``Compose (whole - ops)`` is the whole pipeline
minus the sum of its ops called one by one: the pipeline's own overhead, plus timing noise).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2
import numpy as np
import timm
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from finetune.data.images import load_image
from finetune.data.transforms import (
    PRESETS,
    Augmentation,
    Lighting,
    Preprocessing,
    fit_lighting,
    train_transform,
)

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32  # DataLoader batch size
WARMUP = 20  # images run through each pipeline before timing
MIN_PASS_S = 0.2  # shortest timed pass (seconds); passes over tiny images loop


# --- data ---------------------------------------------------------------------------------------


def fashion_images(count: int) -> list[Path]:
    """``count`` of the sample data's PNGs, spread over all ten classes."""
    paths = sorted((ROOT / "sample_data" / "fashion" / "train").rglob("*.png"))
    if not paths:
        raise SystemExit("No PNGs under sample_data/fashion/train; see sample_data/README.md.")
    step = max(1, len(paths) // count)
    return paths[::step][:count]


def photo_images(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """``count`` JPEGs of ``size`` cut from real photos (random 4:3 windows, resized)."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    sources = [getattr(skimage.data, n)() for n in ("chelsea", "coffee", "astronaut", "rocket")]
    sources += [load_sample_image(n) for n in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        image = Image.fromarray(sources[i % len(sources)])
        w, h = image.size
        fit_w = min(w, h * size[0] / size[1])  # widest window with the target aspect ratio
        cw = int(fit_w * rng.uniform(0.6, 1.0))
        ch = int(cw * size[1] / size[0])
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.LANCZOS)
        path = folder / f"{i:04d}.jpg"
        crop.save(path, quality=90)
        paths.append(path)
    return paths


# --- the torchvision baseline -------------------------------------------------------------------


def pil_decode(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class TorchLighting:
    """AlexNet's PCA lighting on a (3, H, W) float image in 0-1: add ``eigvec @ (alpha * eigval)``
    with ``alpha ~ N(0, sigma)`` per image, then clamp to 0-1 (finetune's PCALighting clips)."""

    def __init__(self, lighting: Lighting, sigma: float) -> None:
        self.eigval = torch.tensor(lighting.eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(lighting.eigvec, dtype=torch.float32)
        self.sigma = sigma

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.sigma
        shift = self.eigvec @ (alpha * self.eigval)
        return (image + shift[:, None, None]).clamp_(0.0, 1.0)


def torchvision_transform(
    pre: Preprocessing, aug: Augmentation, lighting: Lighting, backend: str = "pil"
) -> v2.Compose:
    """The same preset written with torchvision.transforms.v2: PIL image in, float tensor out.
    ``backend="pil"`` runs crop, flip and jitter on the PIL image (torchvision's reference
    recipes' default); ``"tensor"`` converts to a uint8 tensor first."""
    side = pre.input_size
    bicubic = InterpolationMode.BICUBIC
    ops: list[Any] = [v2.ToImage()] if backend == "tensor" else []
    if aug.crop:
        ops.append(
            v2.RandomResizedCrop(
                side, scale=aug.crop_scale, ratio=aug.crop_ratio, interpolation=bicubic,
                antialias=True,
            )
        )  # fmt: skip
    else:
        short = math.floor(side / pre.crop_pct)  # as finetune's eval resize
        ops += [v2.Resize(short, interpolation=bicubic, antialias=True), v2.CenterCrop(side)]
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip(0.5))
    if aug.vflip or aug.rotate90:
        raise SystemExit(f"preset {aug.preset!r}: vflip/rotate90 have no baseline here")
    if aug.jitter_p and (aug.brightness or aug.contrast or aug.saturation or aug.hue):
        jitter = v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)
        ops.append(v2.RandomApply([jitter], p=aug.jitter_p))
    if backend == "pil":
        ops.append(v2.ToImage())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if aug.lighting:
        ops.append(TorchLighting(lighting, aug.lighting))
    ops.append(v2.Normalize(mean=pre.mean, std=pre.std))
    return v2.Compose(ops)


# --- timing -------------------------------------------------------------------------------------


Case = tuple[Callable[[Any], Any], Sequence[Any]]  # (per-image function, its inputs)


def images_per_second(cases: dict[str, Case], repeats: int) -> dict[str, float]:
    """Median images/s of each case over ``repeats`` passes; the cases' passes alternate. A pass
    goes over the images as many times as it takes to last ``MIN_PASS_S`` (tiny images)."""
    loops = {}
    for name, (fn, items) in cases.items():
        for item in items[:WARMUP]:
            fn(item)
        start = time.perf_counter()
        for item in items:
            fn(item)
        loops[name] = max(1, math.ceil(MIN_PASS_S / (time.perf_counter() - start)))
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (fn, items) in cases.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                for item in items:
                    fn(item)
            rates[name].append(loops[name] * len(items) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], fn: Callable[[Path], torch.Tensor]) -> None:
        self.paths, self.fn = list(paths), fn

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.fn(self.paths[index])


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def loader_rates(cases: dict[str, Case], workers: int, repeats: int) -> dict[str, float]:
    """Median images/s of a ``workers``-process DataLoader per case (one warm-up epoch)."""
    loaders = {
        name: torch.utils.data.DataLoader(
            _Images(paths, fn), batch_size=BATCH, num_workers=workers,
            persistent_workers=True, worker_init_fn=_one_thread,
        )
        for name, (fn, paths) in cases.items()
    }  # fmt: skip
    for loader in loaders.values():
        for _ in loader:
            pass
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, loader in loaders.items():
            start = time.perf_counter()
            for _ in loader:
                pass
            rates[name].append(len(loader.dataset) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def per_op_micros(
    ops: Sequence[Callable[[Any], Any]],
    whole: Callable[[Any], Any],
    images: Sequence[Any],
    repeats: int,
) -> tuple[np.ndarray, float]:
    """Median microseconds per image of each op, applied in order (each op's input is the
    previous op's output), and of the whole pipeline."""
    for image in images[:WARMUP]:
        whole(image)
        for op in ops:
            image = op(image)
    totals = np.zeros((repeats, len(ops) + 1))
    for r in range(repeats):
        for image in images:  # image by image: a background load hits the whole and ops alike
            start = time.perf_counter()
            whole(image)
            totals[r, -1] += time.perf_counter() - start
            for i, op in enumerate(ops):
                start = time.perf_counter()
                image = op(image)
                totals[r, i] += time.perf_counter() - start
    micros = np.median(totals, axis=0) / len(images) * 1e6
    return micros[:-1], float(micros[-1])


def op_rows(
    pipeline: Any, images: Sequence[Any], repeats: int, albumentations: bool = False
) -> list[tuple[str, float]]:
    """(op name, microseconds per image) of each op of ``pipeline``, then the pipeline's own
    overhead (the whole minus its ops called one by one), then the whole pipeline."""
    if albumentations:
        names = [type(op).__name__ for op in pipeline.transforms]
        ops = [lambda image, op=op: op(image=image)["image"] for op in pipeline.transforms]
        micros, total = per_op_micros(ops, lambda x: pipeline(image=x), images, repeats)
    else:
        names = [_op_name(op) for op in pipeline.transforms]
        micros, total = per_op_micros(list(pipeline.transforms), pipeline, images, repeats)
    rows = [*zip(names, micros.tolist(), strict=True)]
    return [*rows, ("Compose (whole - ops)", total - micros.sum()), ("whole", total)]


def _op_name(op: Any) -> str:
    if isinstance(op, v2.RandomApply):
        return f"RandomApply({type(op.transforms[0]).__name__})"
    return type(op).__name__


def print_breakdown(title: str, tables: dict[str, list[tuple[str, float]]]) -> None:
    """Side-by-side per-op tables; the last two rows (overhead, whole) line up."""
    print(f"\n{title}")
    ops = max(len(rows) for rows in tables.values()) - 2
    blank = ("", math.nan)
    padded = [rows[:-2] + [blank] * (ops - len(rows) + 2) + rows[-2:] for rows in tables.values()]
    print("    ".join(f"{name:<26}{'us':>6}" for name in tables))
    for line in zip(*padded, strict=True):
        print("    ".join(f"{op:<26}{'' if math.isnan(us) else f'{us:.0f}':>6}" for op, us in line))


# --- the run ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the median counts")
    parser.add_argument("--images", type=int, default=200, help="images per dataset")
    parser.add_argument(
        "--presets", nargs="*", choices=list(PRESETS), default=["default", "strong", "none"]
    )
    parser.add_argument(
        "--datasets", nargs="*", choices=["fashion", "photos"], default=["fashion", "photos"]
    )
    parser.add_argument(
        "--tv-backends",
        nargs="*",
        choices=["pil", "tensor"],
        default=["pil", "tensor"],
        help="what torchvision's crop/flip/jitter run on: PIL images, uint8 tensors, or both",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers for the loader row (0: skip)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    sizes = {"fashion": 64, "photos": 224}
    tvs = [f"tv {backend}" for backend in args.tv_backends]
    breakdowns = []

    loader = f"; loader rows: {args.workers} worker processes in all" if args.workers else ""
    print(
        f"images/s per core (1 thread), median of {args.repeats} passes over {args.images} images"
        f"{loader}\ntv = torchvision v2 with crop/flip/jitter on PIL images or on uint8 tensors"
    )
    header = f"{'dataset':<22}{'preset':<9}{'stage':<17}{'ours':>8}"
    header += "".join(f"{name:>11}" for name in tvs)
    header += "".join(f"{'ours/' + name[3:]:>12}" for name in tvs)
    print(header)
    print("-" * len(header))

    def row(dataset: str, preset: str, stage: str, rates: dict[str, float]) -> None:
        line = f"{dataset:<22}{preset:<9}{stage:<17}{rates['ours']:>8.0f}"
        line += "".join(f"{rates[name]:>11.0f}" for name in tvs)
        line += "".join(f"{rates['ours'] / rates[name]:>11.2f}x" for name in tvs)
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            side = sizes[name]
            if name == "fashion":
                paths = fashion_images(args.images)
            else:
                paths = photo_images(Path(tmp), args.images)
            with Image.open(paths[0]) as first:
                label = f"{name} {first.width}x{first.height}->{side}"
            pre = Preprocessing.from_model(model, side)
            lighting = fit_lighting(paths)
            arrays = [load_image(p) for p in paths]
            pils = [pil_decode(p) for p in paths]

            decode = images_per_second(
                {"ours": (load_image, paths), "tv": (pil_decode, paths)}, args.repeats
            )
            row(label, "-", "decode", {"ours": decode["ours"]} | dict.fromkeys(tvs, decode["tv"]))
            for preset in args.presets:
                aug = PRESETS[preset]
                ours = train_transform(pre, aug, lighting, seed=0)
                pipelines = {
                    f"tv {backend}": torchvision_transform(pre, aug, lighting, backend)
                    for backend in args.tv_backends
                }
                expected = ours(image=arrays[0])["image"]
                for tv in pipelines.values():
                    out = tv(pils[0])
                    if out.shape != expected.shape or out.dtype != expected.dtype:
                        raise SystemExit(f"output {out.shape} {out.dtype} != {expected.shape}")

                def ours_augment(image: np.ndarray, t: Any = ours) -> torch.Tensor:
                    return t(image=image)["image"]

                def ours_full(path: Path, t: Any = ours) -> torch.Tensor:
                    return t(image=load_image(path))["image"]

                def tv_full(path: Path, t: Any) -> torch.Tensor:
                    return t(pil_decode(path))

                augment: dict[str, Case] = {"ours": (ours_augment, arrays)}
                augment |= {name: (tv, pils) for name, tv in pipelines.items()}
                row(label, preset, "augment", images_per_second(augment, args.repeats))
                full: dict[str, Case] = {"ours": (ours_full, paths)}
                full |= {n: (partial(tv_full, t=tv), paths) for n, tv in pipelines.items()}
                row(label, preset, "decode+augment", images_per_second(full, args.repeats))
                if args.workers:
                    rates = loader_rates(full, args.workers, args.repeats)
                    row(label, preset, f"{args.workers}-worker loader", rates)
                if preset == "default":
                    tables = {"ours (albumentations)": op_rows(ours, arrays, args.repeats, True)}
                    for n, tv in pipelines.items():
                        tables[f"torchvision v2, {n[3:]}"] = op_rows(tv, pils, args.repeats)
                    breakdowns.append((f"{label}, preset default: microseconds per image", tables))

    for title, tables in breakdowns:
        print_breakdown(title, tables)


if __name__ == "__main__":
    main()
