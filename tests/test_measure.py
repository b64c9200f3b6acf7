"""What auto measures: data size, similarity (BatchNorm shift) on real images, time per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.scan import scan_folder
from finetune.data.transforms import Preprocessing
from finetune.model.backbone import create_backbone
from finetune.strategies.measure import SIMILAR_BELOW, batchnorm_shift, measure_size, time_per_image

from .conftest import photo_crops


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    return create_backbone("tf_efficientnet_lite0")


def test_size_counts_training_images_per_class(fashion: Path) -> None:
    size = measure_size(scan_folder(fashion))
    assert (size.images, size.classes, size.per_class_median) == (400, 10, 40)
    assert size.imbalance == 1


def test_batchnorm_shift_orders_photos_below_fashion_below_noise(
    backbone: torch.nn.Module, fashion: Path, tmp_path: Path
) -> None:
    noise = tmp_path / "noise"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (noise / name).mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(noise / name / f"{i}.png")
    pre = Preprocessing.from_model(backbone)  # native size, as auto measures
    cpu = torch.device("cpu")
    shifts = {
        name: batchnorm_shift(backbone, scan_folder(folder), pre, cpu, limit=48)
        for name, folder in (
            ("photos", photo_crops(tmp_path / "photos", 8)),
            ("fashion", fashion),
            ("noise", noise),
        )
    }
    assert shifts["photos"] < SIMILAR_BELOW < shifts["fashion"] < shifts["noise"], shifts
    before = [m.running_mean.clone() for m in backbone.modules() if hasattr(m, "running_mean")]
    batchnorm_shift(backbone, scan_folder(fashion), pre, cpu, limit=8)
    after = [m.running_mean for m in backbone.modules() if hasattr(m, "running_mean")]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # read-only


def test_time_per_image_is_measured_and_training_costs_more(backbone: torch.nn.Module) -> None:
    cpu = torch.device("cpu")
    infer = time_per_image(backbone, 64, cpu, train=False, batch=8)
    learn = time_per_image(backbone, 64, cpu, train=True, batch=8)
    assert 0 < infer < learn
    assert all(p.grad is None for p in backbone.parameters())  # timed on a copy


def test_time_per_image_is_timed_in_the_layout_training_uses(backbone: torch.nn.Module) -> None:
    # On a CPU a channels_last step at 224 px took 0.54x the time of a contiguous one
    # (compute.resolve_channels_last); auto must budget with the faster one it will run.
    cpu = torch.device("cpu")
    plain = time_per_image(backbone, 224, cpu, train=True, batch=4)
    nhwc = time_per_image(backbone, 224, cpu, train=True, batch=4, channels_last=True)
    assert nhwc < 0.85 * plain, (nhwc, plain)
    assert all(p.is_contiguous() for p in backbone.parameters())  # timed on a copy
