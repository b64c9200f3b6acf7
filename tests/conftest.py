"""Shared fixtures: real sample data (Fashion-MNIST PNGs), small copies of it, one shared run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Tests never wait on the network: hub look-ups fail at once, as they must in CI. Set before
# timm (and so huggingface_hub, which reads it at import) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

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


@pytest.fixture()
def small_folder(tmp_path: Path) -> Path:
    """Three classes x 20 real images, folder-per-class, for quick fits with a random split."""
    return copy_classes(tmp_path / "small", ["bag", "sneaker", "trouser"], 20)


@pytest.fixture(scope="session")
def linear_run(tmp_path_factory: pytest.TempPathFactory) -> finetune.FitResult:
    """One real fit on the sample data, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("runs") / "linear"
    return finetune.fit(FASHION, strategy="linear", epochs=3, out=str(out), verbose=False)
