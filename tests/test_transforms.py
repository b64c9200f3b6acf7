"""Preprocessing contract and the albumentations pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from finetune.data import load_image
from finetune.transforms import Preprocessing, choose_image_size, eval_transform, train_transform


@pytest.fixture(scope="module")
def lite0_pre() -> Preprocessing:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    return Preprocessing.from_model(model)


def test_preprocessing_comes_from_the_pretrained_config(lite0_pre: Preprocessing) -> None:
    assert lite0_pre == Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.875, "bicubic")
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    pre = Preprocessing.from_model(resnet, 96)
    assert pre.input_size == 96 and pre.mean == pytest.approx((0.485, 0.456, 0.406))
    assert Preprocessing.from_dict(pre.to_dict()) == pre


@pytest.mark.parametrize(
    ("native", "median", "expected"),
    [(224, 28, 64), (224, 50, 128), (224, 500, 224), (224, 0, 224), (256, 100, 224)],
)
def test_image_size_is_native_but_never_far_above_the_images(
    native: int, median: int, expected: int
) -> None:
    assert choose_image_size(native, median) == expected


def test_pipelines_give_normalised_float_tensors(lite0_pre: Preprocessing, fashion) -> None:
    image = load_image(next((fashion / "train" / "bag").glob("*.png")))
    for transform in (train_transform(lite0_pre, seed=0), eval_transform(lite0_pre)):
        out = transform(image=image)["image"]
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        assert out.min() >= -1.0 - 1e-5 and out.max() <= 1.0 + 1e-5  # mean = std = 0.5
    wide = np.zeros((30, 90, 3), np.uint8)
    wide[:, 30:60] = 255  # a white centre square survives the centre crop
    out = eval_transform(lite0_pre)(image=wide)["image"]
    assert out.shape == (3, 224, 224) and out[:, 112, 112].min() > 0.99


def test_training_augmentation_is_random_but_reproducible(lite0_pre: Preprocessing, fashion):
    image = load_image(next((fashion / "train" / "coat").glob("*.png")))
    a, b, c = (train_transform(lite0_pre, seed=s) for s in (0, 0, 1))
    first_a = [a(image=image)["image"] for _ in range(3)]
    first_b = [b(image=image)["image"] for _ in range(3)]
    first_c = [c(image=image)["image"] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first_a, first_b, strict=True))
    assert not torch.equal(first_a[0], first_a[1])
    assert not all(torch.equal(x, y) for x, y in zip(first_a, first_c, strict=True))
