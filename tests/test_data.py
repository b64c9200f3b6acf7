"""Folder scanning, splitting and decoding on real images and deliberately messy folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data import ImageDataset, collate_skipping_failed, load_image, scan_folder
from finetune.errors import DataError

from .conftest import copy_classes


def test_train_val_layout_is_used_as_is_and_test_is_left_alone(fashion: Path) -> None:
    split = scan_folder(fashion)
    assert split.layout == "train/val folders"
    assert split.classes == tuple(sorted(p.name for p in (fashion / "train").iterdir()))
    assert len(split.classes) == 10
    assert len(split.train) == 400 and len(split.val) == 100
    assert all("/test/" not in s.path.as_posix() for s in split.train + split.val)
    assert all("/val/" in s.path.as_posix() for s in split.val)
    assert split.median_side == 28


def test_valid_folder_name_is_accepted(tmp_path: Path) -> None:
    copy_classes(tmp_path / "train", ["bag", "coat"], 4)
    copy_classes(tmp_path / "valid", ["bag", "coat"], 2, split="val")
    split = scan_folder(tmp_path)
    assert split.layout == "train/val folders"
    assert len(split.val) == 4


def test_random_split_is_stratified_and_seeded(small_folder: Path) -> None:
    a = scan_folder(small_folder, val_split=0.25, seed=0)
    b = scan_folder(small_folder, val_split=0.25, seed=0)
    c = scan_folder(small_folder, val_split=0.25, seed=1)
    assert a.layout == "random split"
    assert a.train == b.train and a.val == b.val
    assert a.val != c.val
    assert a.counts("val") == {"bag": 5, "sneaker": 5, "trouser": 5}
    assert a.counts("train") == {"bag": 15, "sneaker": 15, "trouser": 15}
    assert not {s.path for s in a.train} & {s.path for s in a.val}


def test_hidden_entries_are_never_classes_and_bad_files_are_skipped_by_name(
    small_folder: Path,
) -> None:
    (small_folder / ".ipynb_checkpoints").mkdir()
    shutil.copy(next((small_folder / "bag").glob("*.png")), small_folder / ".ipynb_checkpoints")
    (small_folder / "bag" / ".DS_Store").write_bytes(b"\x00\x01")
    (small_folder / "bag" / "notes.txt").write_text("not an image")
    (small_folder / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (small_folder / "empty-class").mkdir()
    with pytest.warns(UserWarning) as record:
        split = scan_folder(small_folder)
    messages = " ".join(str(w.message) for w in record)
    assert split.classes == ("bag", "sneaker", "trouser")
    assert "notes.txt" in messages and "broken.png" in messages and "empty-class" in messages
    assert ".DS_Store" not in messages
    skipped = {p.name for p, _ in split.skipped}
    assert skipped == {"notes.txt", "broken.png"}
    assert all(s.path.name != "broken.png" for s in split.train + split.val)


def test_structure_errors_say_what_to_do(tmp_path: Path) -> None:
    copy_classes(tmp_path / "one", ["bag"], 5)
    with pytest.raises(DataError, match="at least two class folders"):
        scan_folder(tmp_path / "one")
    copy_classes(tmp_path / "tiny", ["bag"], 5)
    copy_classes(tmp_path / "tiny", ["coat"], 1)
    with pytest.raises(DataError, match=r"coat \(1\)"):
        scan_folder(tmp_path / "tiny")
    with pytest.raises(DataError, match="is not a folder"):
        scan_folder(tmp_path / "missing")
    copy_classes(tmp_path / "tv" / "train", ["bag", "coat"], 3)
    copy_classes(tmp_path / "tv" / "val", ["bag", "coat", "dress"], 1, split="val")
    with pytest.raises(DataError, match="dress"):
        scan_folder(tmp_path / "tv")


def test_every_mode_becomes_rgb(tmp_path: Path) -> None:
    grey = Image.fromarray(np.full((5, 7), 100, np.uint8), mode="L")
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    palette = Image.new("P", (3, 3), 0)
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # red
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    for name, img in {"g.png": grey, "a.png": rgba, "p.png": palette, "c.jpg": cmyk}.items():
        img.save(tmp_path / name)
    deep.save(tmp_path / "d.png")
    g = load_image(tmp_path / "g.png")
    assert g.shape == (5, 7, 3) and g.dtype == np.uint8 and (g == 100).all()
    assert (load_image(tmp_path / "a.png") == 255).all()
    assert load_image(tmp_path / "p.png").shape == (3, 3, 3)
    c = load_image(tmp_path / "c.jpg")
    assert c[..., 0].mean() > 200 and c[..., 1].mean() < 60
    d = load_image(tmp_path / "d.png")
    assert d.shape == (4, 4, 3) and (d == 255).all()


def test_dataset_drops_undecodable_images_with_a_warning(small_folder: Path) -> None:
    split = scan_folder(small_folder)
    victim = split.train[0].path
    victim.write_bytes(victim.read_bytes()[:40])  # truncated after the header was scanned
    dataset = ImageDataset(split.train[:4])
    with pytest.warns(UserWarning, match=victim.name):
        batch = collate_skipping_failed([dataset[i] for i in range(4)])
    images, labels = batch
    assert images.shape == (3, 28, 28, 3) and labels.shape == (3,)
