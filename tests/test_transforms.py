"""Preprocessing contract and the albumentations pipelines."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from finetune.config import PRESET_NAMES, TTA_MODES, FitConfig
from finetune.data.images import load_image
from finetune.data.transforms import (
    IMAGENET_LIGHTING,
    PRESETS,
    Augmentation,
    DeviceNormalize,
    Lighting,
    PCALighting,
    Preprocessing,
    TestTimeViews,
    augmentation_ops,
    choose_image_size,
    eval_transform,
    fit_lighting,
    preset_for,
    train_transform,
)
from finetune.errors import ConfigError


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


def test_uint8_pipelines_normalised_on_the_device_give_the_same_tensors(
    lite0_pre: Preprocessing, fashion
) -> None:
    """normalize=False stops at uint8 (a quarter of the bytes through a DataLoader) and
    DeviceNormalize finishes: the same images as the float pipelines, in the same layout."""
    image = load_image(next((fashion / "train" / "dress").glob("*.png")))
    normalize = DeviceNormalize.of(lite0_pre)
    pairs = [
        (train_transform(lite0_pre, seed=3), train_transform(lite0_pre, seed=3, normalize=False)),
        (eval_transform(lite0_pre), eval_transform(lite0_pre, normalize=False)),
    ]
    for floats, uint8 in pairs:
        for _ in range(3):  # the same random draws on both sides
            want = floats(image=image)["image"]
            raw = uint8(image=image)["image"]
            assert raw.dtype == torch.uint8 and raw.shape == want.shape
            batch = raw[None].contiguous(memory_format=torch.channels_last)
            got = normalize(batch)
            assert got.dtype == torch.float32
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert torch.allclose(got[0], want, atol=1e-6)
    imagenet = DeviceNormalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    white = imagenet(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(white[0, :, 0, 0], torch.tensor([2.2489, 2.4286, 2.64]), atol=1e-4)
    already = torch.randn(2, 3, 4, 4)
    assert normalize(already) is already  # floats (normalised, or a frozen layer's) pass


def test_training_augmentation_is_random_but_reproducible(lite0_pre: Preprocessing, fashion):
    image = load_image(next((fashion / "train" / "coat").glob("*.png")))
    a, b, c = (train_transform(lite0_pre, seed=s) for s in (0, 0, 1))
    first_a = [a(image=image)["image"] for _ in range(3)]
    first_b = [b(image=image)["image"] for _ in range(3)]
    first_c = [c(image=image)["image"] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first_a, first_b, strict=True))
    assert not torch.equal(first_a[0], first_a[1])
    assert not all(torch.equal(x, y) for x, y in zip(first_a, first_c, strict=True))


@pytest.fixture(scope="module")
def pre64(lite0_pre: Preprocessing) -> Preprocessing:
    return Preprocessing.from_dict({**lite0_pre.to_dict(), "input_size": 64})


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_preset_gives_normalised_tensors_of_the_input_size(
    preset: str, pre64: Preprocessing, fashion
) -> None:
    assert tuple(PRESETS) == PRESET_NAMES and tuple(TTA_MODES) == ("none", "flip", "10crop")
    image = load_image(next((fashion / "train" / "dress").glob("*.png")))
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    tiny = np.full((5, 5, 3), 200, np.uint8)  # smaller than the crop: upscaled, never rejected
    transform = train_transform(pre64, PRESETS[preset], IMAGENET_LIGHTING, seed=0)
    for source in (image, rgb, tiny):
        for _ in range(5):
            out = transform(image=source)["image"]
            assert out.shape == (3, 64, 64) and out.dtype == torch.float32
            assert out.min() >= -1.0 - 1e-5 and out.max() <= 1.0 + 1e-5  # (0..1 - 0.5) / 0.5
        uint8 = A_compose(augmentation_ops(pre64, PRESETS[preset], IMAGENET_LIGHTING))(
            image=source
        )["image"]
        assert uint8.shape == (64, 64, 3) and uint8.dtype == np.uint8


def A_compose(ops):
    import albumentations as A

    return A.Compose(ops, seed=0)


def test_presets_get_stronger_as_data_gets_smaller() -> None:
    assert [preset_for(n)[0] for n in (10, 99, 100, 999, 1000, 50_000)] == [
        "strong", "strong", "default", "default", "light", "light",
    ]  # fmt: skip
    areas = [PRESETS[name].crop_scale[0] for name in ("light", "default", "strong")]
    assert areas == sorted(areas, reverse=True)
    lights = [PRESETS[name].lighting for name in ("none", "light", "default", "strong")]
    assert lights == sorted(lights) and lights[0] == 0
    assert PRESETS["default"].lighting == 0.1  # AlexNet's sigma


def test_options_override_single_fields_of_a_preset() -> None:
    aug = Augmentation.from_preset("light", vflip=True, lighting=0.0, hue=None)
    assert aug.vflip and aug.lighting == 0 and aug.hue == PRESETS["light"].hue
    assert aug.crop_scale == PRESETS["light"].crop_scale
    with pytest.raises(ConfigError, match="choose one of none, light, default, strong"):
        Augmentation.from_preset("heavy")
    config = FitConfig(crop_scale=[0.2, 1.0])  # a list, as JSON gives it
    assert config.crop_scale == (0.2, 1.0)
    for bad in ({"crop_scale": (0.5, 0.2)}, {"crop_scale": (0.2, 1.5)}, {"hue": 0.7},
                {"lighting": -1.0}, {"augment": "heavy"}, {"tta": "5crop"}):  # fmt: skip
        with pytest.raises(ConfigError):
            FitConfig(**bad)


def test_vertical_flips_and_rotations_only_when_asked(pre64: Preprocessing) -> None:
    # A 73 px square (the evaluation resize of 64 px at crop_pct 0.875) with one bright corner.
    image = np.zeros((73, 73, 3), np.uint8)
    image[:20, :20] = 255
    corners = {"plain": set(), "vflip": set(), "rotate90": set()}
    for name, aug in (
        ("plain", PRESETS["none"]),
        ("vflip", Augmentation.from_preset("none", vflip=True)),
        ("rotate90", Augmentation.from_preset("none", rotate90=True)),
    ):
        ops = A_compose(augmentation_ops(pre64, aug))
        for _ in range(40):
            out = ops(image=image)["image"]
            bright = out[[0, 0, -1, -1], [0, -1, 0, -1], 0] > 128
            corners[name].add(int(np.flatnonzero(bright)[0]))
    assert corners == {"plain": {0}, "vflip": {0, 2}, "rotate90": {0, 1, 2, 3}}


def test_pca_lighting_follows_the_eigenvectors_with_zero_mean(pre64: Preprocessing) -> None:
    """AlexNet's rule: every pixel moves by eigvec @ (alpha * eigval), alpha ~ N(0, sigma)."""
    lighting = IMAGENET_LIGHTING
    sigma, draws = 0.1, 4000
    grey = np.full((8, 8, 3), 128, np.uint8)  # mid-grey: no clipping
    transform = PCALighting(lighting, sigma=sigma)
    transform.set_random_seed(0)
    shifts = []
    for _ in range(draws):
        out = transform(image=grey)["image"].astype(np.float64)
        assert (out == out[0, 0]).all()  # the same shift for every pixel
        shifts.append((out[0, 0] - 128) / 255)
    shifts = np.array(shifts)
    eigvec, eigval = np.array(lighting.eigvec), np.array(lighting.eigval)
    assert np.abs(shifts.mean(0)).max() < 3 * sigma * eigval[0] / np.sqrt(draws) + 1 / 255
    # Coordinates along the eigenvectors (columns): independent, std sigma * eigval.
    coords = shifts @ eigvec
    assert coords[:, 0].std() == pytest.approx(sigma * eigval[0], rel=0.06)
    assert coords[:, 1].std() == pytest.approx(sigma * eigval[1], rel=0.3)  # 1/255 rounding
    assert abs(np.corrcoef(coords[:, 0], coords[:, 1])[0, 1]) < 0.1
    # Not albumentations' FancyPCA (the PCA of each image): a flat red image has no colour
    # variance of its own, yet moves along the dataset's first component.
    red = np.zeros((8, 8, 3), np.uint8)
    red[...] = (200, 90, 90)
    one_axis = Lighting((0.2, 0.0, 0.0), lighting.eigvec, "first component only")
    strong = PCALighting(one_axis, sigma=0.3)
    strong.set_random_seed(1)
    for _ in range(5):
        moved = strong(image=red)["image"].astype(float)[0, 0] - red[0, 0]
        direction = np.abs(moved / np.linalg.norm(moved))
        assert direction == pytest.approx(np.abs(eigvec[:, 0]), abs=0.05)


def test_lighting_is_measured_on_the_training_images(tmp_path, fashion) -> None:
    import skimage

    # Grey images: one component, the grey axis, carries all the variance.
    grey = fit_lighting(sorted((fashion / "train").rglob("*.png")))
    assert grey.source == "training set (400 images)"
    assert np.abs(np.array(grey.eigvec)[:, 0]) == pytest.approx([3**-0.5] * 3, abs=1e-6)
    assert grey.eigval[0] > 0.1 and max(grey.eigval[1:]) < 1e-9
    # Colour photos: the PCA of all their pixels, as numpy computes it.
    photo = skimage.data.coffee()
    paths = []
    for i in range(4):
        tile = photo[:, i * 150 : (i + 1) * 150]
        paths.append(tmp_path / f"{i}.png")
        from PIL import Image

        Image.fromarray(tile).save(paths[-1])
    measured = fit_lighting(paths, pixels_per_image=10**9)
    expected = np.linalg.eigvalsh(np.cov(photo[:, :600].reshape(-1, 3) / 255.0, rowvar=False))
    assert measured.eigval == pytest.approx(sorted(expected, reverse=True), rel=1e-6)
    assert Lighting.from_dict(measured.to_dict()) == measured
    # Nothing readable: ImageNet's published values.
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert fit_lighting([tmp_path / "bad.png"]) is IMAGENET_LIGHTING


def test_tta_views_have_the_ten_crop_geometry(pre64: Preprocessing) -> None:
    # 73 x 90: already the evaluation resize (short side 64 / 0.875 = 73), so crops are slices.
    image = np.random.default_rng(0).integers(0, 256, (73, 90, 3), dtype=np.uint8)
    views = TestTimeViews(pre64, "10crop")
    crops = views.crops(image)
    assert views.count == len(crops) == 10 and all(c.shape == (64, 64, 3) for c in crops)
    top, left = (73 - 64) // 2, (90 - 64) // 2
    expected = [image[:64, :64], image[:64, -64:], image[-64:, :64], image[-64:, -64:],
                image[top : top + 64, left : left + 64]]  # fmt: skip
    for got, want in zip(crops[:5], expected, strict=True):
        assert np.array_equal(got, want)
    for got, want in zip(crops[5:], expected, strict=True):
        assert np.array_equal(got, want[:, ::-1])
    tensors = views(image)
    assert tensors.shape == (10, 3, 64, 64) and tensors.dtype == torch.float32
    # "none" is exactly the evaluation transform; "flip" adds its mirror image.
    centre = eval_transform(pre64)(image=image)["image"]
    assert torch.equal(TestTimeViews(pre64, "none")(image)[0], centre)
    flip = TestTimeViews(pre64, "flip")(image)
    assert torch.equal(flip[0], centre) and torch.equal(flip[1], centre.flip(-1))
    with pytest.raises(ConfigError, match="none, flip, 10crop"):
        TestTimeViews(pre64, "5crop")


_IMPORT_WATCHING_THE_NETWORK = """
import urllib.request
calls = []
def refuse(self, request, *args, **kwargs):
    calls.append(getattr(request, "full_url", request))
    raise OSError("offline")
urllib.request.OpenerDirector.open = refuse
import finetune.data.transforms
import os
print(len(calls), os.environ["NO_ALBUMENTATIONS_UPDATE"])
"""


def test_importing_the_pipelines_asks_no_server_for_anything() -> None:
    """albumentations checks PyPI for a newer version on import unless told not to: finetune
    tells it, so no command makes a network request (a user's own setting is kept)."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    for setting, expected in ((None, "0 1"), ("false", "1 false")):
        if setting is not None:
            env["NO_ALBUMENTATIONS_UPDATE"] = setting
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT_WATCHING_THE_NETWORK],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == expected.split(), done.stdout
