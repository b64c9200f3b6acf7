"""Shared fixtures: real sample data (Fashion-MNIST PNGs), small copies of it, one shared run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Tests never wait on the network: hub look-ups fail at once, as they must in CI. Set before
# timm (and so huggingface_hub, which reads it at import) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
# Many tests start several processes side by side (fits, CLI commands) on CI's two cores. GNU
# OpenMP's threads spin up to 300,000 times before they sleep, burning the cores the other
# processes need; 10,000 spins give them back without slowing a process that runs alone (where
# OMP_WAIT_POLICY=PASSIVE made bf16 steps 7x slower): benchmarks/omp_wait.py. Inherited by every
# child process.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np
import pytest
from PIL import Image

import finetune

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "sample_data" / "fashion"


@pytest.fixture(scope="session")
def fashion() -> Path:
    """The shipped sample data: train/ val/ test/ folders of 10 Fashion-MNIST classes."""
    return FASHION


def copy_classes(dest: Path, classes: list[str], per_class: int, split: str = "train") -> Path:
    """A folder-per-class tree (no train/val) of the first images of some Fashion classes."""
    for name in classes:
        (dest / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((FASHION / split / name).glob("*.png"))[:per_class]:
            shutil.copy(path, dest / name / path.name)
    return dest


def photo_crops(dest: Path, per_class: int, size: int = 96, seed: int = 0) -> Path:
    """A folder-per-class tree of random square crops of seven real photos (scikit-image's and
    scikit-learn's sample images): natural images, close to ImageNet's. The class is the photo."""
    import skimage
    import sklearn.datasets

    photos = {
        "astronaut": skimage.data.astronaut(),
        "cat": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "motorcycle": skimage.data.stereo_motorcycle()[0],
        "palace": sklearn.datasets.load_sample_image("china.jpg"),
        "flower": sklearn.datasets.load_sample_image("flower.jpg"),
    }
    rng = np.random.default_rng(seed)
    for name, photo in photos.items():
        (dest / name).mkdir(parents=True, exist_ok=True)
        h, w = photo.shape[:2]
        for i in range(per_class):
            side = int(rng.uniform(0.2, 0.5) * min(h, w))
            y, x = rng.integers(0, h - side), rng.integers(0, w - side)
            crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size))
            crop.save(dest / name / f"{i:04d}.png")
    return dest


@pytest.fixture()
def small_folder(tmp_path: Path) -> Path:
    """Three classes x 20 real images, folder-per-class, for quick fits with a random split."""
    return copy_classes(tmp_path / "small", ["bag", "sneaker", "trouser"], 20)


@pytest.fixture(scope="session")
def linear_run(tmp_path_factory: pytest.TempPathFactory) -> finetune.FitResult:
    """One real fit on the sample data, shared by the tests that only read its outputs (not a
    report: report_run has one)."""
    out = tmp_path_factory.mktemp("runs") / "linear"
    return finetune.fit(FASHION, strategy="linear", out=str(out), verbose=False, report=False)


def noise_folder(root: Path, per_class: int) -> Path:
    """Two classes of uniform-noise 32 px images: as far from ImageNet as images get."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three one-epoch finetune-top runs on 3 Fashion classes x 8 images (about a second each):
    seeds 0 and 1 at 32 px, seed 2 at 48 px, so their weights and preprocessing differ."""
    root = tmp_path_factory.mktemp("tiny")
    data = copy_classes(root / "data", ["bag", "sneaker", "trouser"], 8)
    return [
        finetune.fit(
            data,
            strategy="finetune-top",
            epochs=1,
            image_size=size,
            seed=seed,
            out=str(root / f"run{seed}-{size}px"),
            verbose=False,
            report=False,
        ).dir
        for seed, size in ((0, 32), (1, 32), (2, 48))
    ]


@pytest.fixture(scope="session")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> finetune.FitResult:
    """A two-epoch finetune-top run with EMA on 4 Fashion classes x 10 images (a random split:
    8 train, 2 val each) at 32 px, with the report.html fit writes: a few seconds."""
    root = tmp_path_factory.mktemp("report")
    data = copy_classes(root / "data", ["bag", "coat", "sneaker", "trouser"], 10)
    return finetune.fit(
        data,
        strategy="finetune-top",
        epochs=2,
        image_size=32,
        ema=True,
        out=str(root / "runs" / "top"),
        verbose=False,
    )


@dataclass(frozen=True)
class CliRuns:
    """Runs of the real ``finetune fit`` command, shared by the CLI tests that read them."""

    data: Path  # bag, sneaker, trouser x 20 images, folder-per-class
    runs: Path  # the folder holding the three run directories
    auto: Path  # `fit DATA --image-size 32`: auto's choice (stage-probe on this data)
    json: Path  # `--strategy finetune-top --epochs 2 --log-format json`
    quiet: Path  # `--strategy linear -q`
    fits: dict[str, subprocess.CompletedProcess]  # each fit's output, by run name


@pytest.fixture(scope="session")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> CliRuns:
    """Three ``finetune fit`` processes, run once side by side (each spends most of its time
    importing torch on one core) on 3 Fashion classes x 20 images at 32 px. The predict,
    evaluate, export, report and runs tests read these runs instead of training their own;
    tests that write into a run directory write only files of their own names."""
    root = tmp_path_factory.mktemp("cli")
    data = copy_classes(root / "data", ["bag", "sneaker", "trouser"], 20)
    runs = root / "runs"
    common = [str(data), "--image-size", "32"]
    commands = {
        "auto": [*common, "--out", str(runs / "auto")],
        "json": [*common, "--strategy", "finetune-top", "--epochs", "2", "--log-format", "json",
                 "--out", str(runs / "json")],
        "quiet": [*common, "--strategy", "linear", "-q", "--out", str(runs / "quiet")],
    }  # fmt: skip
    exe = Path(sys.executable).with_name("finetune")

    def fit(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(exe), "fit", *args], capture_output=True, text=True, timeout=600, check=False
        )

    with ThreadPoolExecutor(len(commands)) as pool:
        fits = dict(zip(commands, pool.map(fit, commands.values()), strict=True))
    return CliRuns(data, runs, runs / "auto", runs / "json", runs / "quiet", fits)
