"""The decoded-image cache: each image decoded once, resized, memory-mapped by later epochs
and runs; evaluation unchanged bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import finetune
from finetune.data.decoded import DecodedCache, estimate_bytes
from finetune.data.images import load_image
from finetune.data.loaders import ImageDataset
from finetune.data.scan import Sample, scan_folder
from finetune.data.transforms import Preprocessing, eval_transform, resize_side

from .conftest import photo_crops

PRE = Preprocessing(48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "bicubic")


@pytest.fixture()
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "decoded"


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    """Seven classes of 96 px crops of real photos: larger than the 54 px resize side."""
    return photo_crops(tmp_path / "photos", per_class=4, size=96)


def test_images_are_stored_once_resized_and_evaluate_exactly_as_decoded_files(
    photos: Path, tmp_path: Path
) -> None:
    split = scan_folder(photos)
    samples = [*split.train, *split.val]
    assert all(s.digest and s.width == 96 for s in samples)  # the scan's digest and size
    cache = DecodedCache.for_preprocessing(PRE, tmp_path / "c")
    assert cache.side == resize_side(PRE) == 54

    fill = cache.fill(samples)
    assert (fill.images, fill.added, fill.failed) == (28, 28, 0)
    files = sorted(cache.folder.rglob("*.npy"))
    assert len(files) == 28 and fill.bytes == sum(f.stat().st_size for f in files)
    assert fill.bytes == estimate_bytes(samples, cache.side)  # the estimate auto relies on
    again = cache.fill(samples)
    assert (again.images, again.added) == (28, 0)

    transform = eval_transform(PRE)
    for sample in samples:
        stored = cache.load(sample)
        assert stored.dtype == np.uint8 and stored.shape == (54, 54, 3)
        assert isinstance(stored, np.memmap)
        decoded = transform(image=load_image(sample.path))["image"]
        np.testing.assert_array_equal(transform(image=stored)["image"], decoded)


def test_small_images_are_kept_as_decoded_and_identical_files_share_one_entry(
    fashion: Path, tmp_path: Path
) -> None:
    first = sorted((fashion / "train" / "bag").glob("*.png"))[0]
    (tmp_path / "a").mkdir()
    shutil.copy(first, tmp_path / "a" / "one.png")
    shutil.copy(first, tmp_path / "a" / "same-content.png")
    cache = DecodedCache(256, cv2.INTER_CUBIC, tmp_path / "c")
    samples = [Sample(p, 0) for p in sorted((tmp_path / "a").iterdir())]  # no scan: no digest
    fill = cache.fill(samples)
    assert fill.images == 1 and len(list(cache.folder.rglob("*.npy"))) == 1
    np.testing.assert_array_equal(cache.load(samples[1]), load_image(first))  # 28 px: not upscaled


def test_the_dataset_reads_the_cache_not_the_files(photos: Path, tmp_path: Path) -> None:
    split = scan_folder(photos)
    cache = DecodedCache.for_preprocessing(PRE, tmp_path / "c")
    cache.fill(split.train)
    expected = [item[0] for item in ImageDataset(split.train, eval_transform(PRE), cache)]
    for sample in split.train:  # the files are gone: only the cache can answer
        sample.path.write_bytes(b"not an image any more")
    dataset = ImageDataset(split.train, eval_transform(PRE), cache)
    for item, image in zip(dataset, expected, strict=True):
        assert item is not None
        np.testing.assert_array_equal(item[0].numpy(), image.numpy())
    with pytest.warns(UserWarning, match="cannot decode"):  # without the cache: unreadable
        assert ImageDataset(split.train, eval_transform(PRE))[0] is None


def test_a_damaged_cache_file_is_decoded_again(photos: Path, tmp_path: Path) -> None:
    sample = scan_folder(photos).train[0]
    cache = DecodedCache.for_preprocessing(PRE, tmp_path / "c")
    good = np.array(cache.load(sample))
    cache.path(sample.digest).write_bytes(b"\x93NUMPY truncated")
    np.testing.assert_array_equal(cache.load(sample), good)
    np.testing.assert_array_equal(np.load(cache.path(sample.digest)), good)  # rewritten


def test_a_cached_array_of_the_wrong_shape_or_dtype_is_decoded_again(
    photos: Path, tmp_path: Path
) -> None:
    sample = scan_folder(photos).train[0]
    cache = DecodedCache.for_preprocessing(PRE, tmp_path / "c")
    good = np.array(cache.load(sample))
    h, w = good.shape[:2]
    wrong = [
        np.zeros((h, w, 3), np.float32),  # the wrong dtype
        np.zeros((h, w), np.uint8),  # greyscale: the wrong shape
        np.zeros((h, w, 4), np.uint8),
        np.zeros((h // 2, w, 3), np.uint8),  # another image's size
        np.zeros((0, w, 3), np.uint8),
        np.zeros((3,), np.int64),
    ]
    for array in wrong:
        np.save(cache.path(sample.digest), array)
        np.testing.assert_array_equal(cache.load(sample), good)
        np.save(cache.path(sample.digest), array)
        assert cache.fill([sample]).added == 1  # fill decodes it again too
        np.testing.assert_array_equal(np.load(cache.path(sample.digest)), good)


def test_identical_files_are_counted_once_in_the_fill_summary(
    fashion: Path, tmp_path: Path
) -> None:
    first = sorted((fashion / "train" / "bag").glob("*.png"))[0]
    (tmp_path / "a").mkdir()
    for name in ("one.png", "two.png", "three.png"):
        shutil.copy(first, tmp_path / "a" / name)
    samples = [Sample(p, 0) for p in sorted((tmp_path / "a").iterdir())]
    fill = DecodedCache(256, cv2.INTER_CUBIC, tmp_path / "c").fill(samples)
    assert (fill.images, fill.added, fill.failed) == (1, 1, 0)
    assert "0 reused" in fill.describe()  # was "-2 reused"


def test_estimate_brings_the_short_side_down_and_never_up() -> None:
    big = Sample(Path("big.jpg"), 0, "d", width=4000, height=3000)
    small = Sample(Path("small.png"), 0, "e", width=28, height=28)
    assert estimate_bytes([big], 256) == 256 * 341 * 3 + 128
    assert estimate_bytes([small], 256) == 28 * 28 * 3 + 128


def test_fit_leaves_small_images_alone_fills_the_cache_once_and_a_second_run_reuses_it(
    small_folder: Path, tmp_path: Path, cache_home: Path, capsys: pytest.CaptureFixture
) -> None:
    options = {"strategy": "finetune-top", "epochs": 1, "image_size": 32, "report": False}
    run = finetune.fit(small_folder, out=str(tmp_path / "r0"), **options)  # 28 px images
    assert "cache     off: the images are already small (median side 28 px" in (
        capsys.readouterr().err
    )
    assert json.loads((run.dir / "config.json").read_text())["cache_images"] is False
    assert not cache_home.exists()

    options["cache_images"] = True
    run = finetune.fit(small_folder, out=str(tmp_path / "r1"), **options)
    log = capsys.readouterr().err
    assert "cache     60 decoded images" in log and "(60 decoded now" in log
    assert json.loads((run.dir / "config.json").read_text())["cache_images"] is True
    assert len(list(cache_home.rglob("*.npy"))) == 60

    finetune.fit(small_folder, out=str(tmp_path / "r2"), **options)
    log = capsys.readouterr().err
    assert "(0 decoded now" in log and "60 reused" in log

    shutil.rmtree(cache_home)
    options["cache_images"] = False
    run = finetune.fit(small_folder, out=str(tmp_path / "r3"), **options)
    assert "decoded images" not in capsys.readouterr().err and not cache_home.exists()
    assert json.loads((run.dir / "config.json").read_text())["cache_images"] is False


def test_fit_caches_images_larger_than_the_input_by_default(
    photos: Path, tmp_path: Path, cache_home: Path
) -> None:
    run = finetune.fit(photos, strategy="finetune-top", epochs=1, image_size=32,
                       out=str(tmp_path / "run"), verbose=False, report=False)  # fmt: skip
    assert json.loads((run.dir / "config.json").read_text())["cache_images"] is True
    assert len(list(cache_home.rglob("*.npy"))) == 28  # 96 px photos, stored at 36 px
