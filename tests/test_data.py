"""Folder scanning, splitting and decoding on real images and deliberately messy folders."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data.images import load_image
from finetune.data.loaders import ImageDataset, collate_skipping_failed
from finetune.data.scan import scan_folder
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


def _bomb_png() -> bytes:
    """A PNG whose header declares 100,000 x 100,000 pixels (no pixel data follows)."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _messy_folder(root: Path, fashion: Path) -> Path:
    """Every mess the issue lists, beside ordinary images."""
    copy_classes(root, ["bag", "sneaker"], 6)
    bag, sneaker = root / "bag", root / "sneaker"
    good = next(bag.glob("*.png")).read_bytes()
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        jpeg, "JPEG"
    )
    (bag / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (bag / "zero.png").write_bytes(b"")
    (bag / "notes.txt").write_text("not an image")
    (bag / "text-as.png").write_text("a text file with an image's extension")
    (bag / "bomb.png").write_bytes(_bomb_png())
    (bag / ".DS_Store").write_bytes(b"\x00\x01")
    (sneaker / "Thumbs.db").write_bytes(b"\x00")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.png").write_bytes(good)
    (root / "empty-class").mkdir()
    (root / "labels.csv").write_text("a stray file beside the class folders")
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(sneaker / "cmyk.jpg")
    Image.new("RGBA", (30, 30), (255, 0, 0, 128)).save(sneaker / "rgba.png")
    palette = Image.new("P", (30, 30), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(sneaker / "palette.png", transparency=1)
    ramp = (np.arange(30 * 30, dtype=np.uint32).reshape(30, 30) * 72).astype(np.uint16)
    Image.fromarray(ramp).save(sneaker / "deep16.png")  # 0 .. 64728 of 65535
    Image.new("RGB", (5, 5), (200, 10, 10)).save(sneaker / "tiny.png")
    (sneaker / "sous-dossier été").mkdir()
    (sneaker / "sous-dossier été" / "chaussure rouge ü.png").write_bytes(good)
    os.symlink(bag / sorted(p.name for p in bag.glob("0*.png"))[0], sneaker / "link.png")
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # left half white: a 40 x 20 image, asymmetric
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(wide).save(sneaker / "rotated.jpg", exif=exif.tobytes(), quality=95)
    return root


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_a_messy_folder_is_scanned_right_and_left_untouched(
    tmp_path: Path, fashion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    root = _messy_folder(tmp_path / "messy", fashion)
    before = _digests(root)
    split = scan_folder(root, val_split=0.3)
    assert split.classes == ("bag", "sneaker")
    report = split.report
    reasons = {p.name: r for p, r in report.skipped}
    assert set(reasons) == {
        "truncated.jpg", "zero.png", "notes.txt", "text-as.png", "bomb.png", ".DS_Store",
        "Thumbs.db", ".ipynb_checkpoints", "empty-class", "labels.csv",
    }  # fmt: skip
    assert "truncated" in reasons["truncated.jpg"] and "0 bytes" in reasons["zero.png"]
    assert "decompression bomb" in reasons["bomb.png"] and "not an image" in reasons["text-as.png"]
    assert (
        "hidden folder" in reasons[".ipynb_checkpoints"] and "not a class" in reasons["empty-class"]
    )
    used = {s.path.name for s in split.train + split.val}
    assert used >= {"cmyk.jpg", "rgba.png", "palette.png", "deep16.png", "tiny.png", "link.png",
                    "chaussure rouge ü.png", "rotated.jpg"}  # fmt: skip
    assert not used & set(reasons)
    notes = {p.name: n for p, n in report.notes}
    assert "tiny image (5x5 px)" in notes["tiny.png"] and "symlink" in notes["link.png"]
    # The symlink and the unicode copy are the same image as a bag: leakage across classes.
    assert any("classes bag and sneaker" in what for what, _ in report.leaks)
    text = report.text()
    assert all(name in text for name in reasons)
    # Decoding: upright, composited, scaled.
    rotated = load_image(root / "sneaker" / "rotated.jpg")
    assert rotated.shape == (40, 20, 3)  # turned upright: taller than wide
    assert rotated[:18].mean() > 200 and rotated[22:].mean() < 50  # white half now on top
    deep = load_image(root / "sneaker" / "deep16.png")
    assert deep.min() == 0 and deep.max() >= 250 and len(np.unique(deep)) > 200  # not clamped
    assert tuple(load_image(root / "sneaker" / "rgba.png")[0, 0]) == (255, 127, 127)
    assert tuple(load_image(root / "sneaker" / "palette.png")[0, 0]) == (255, 255, 255)
    assert load_image(root / "sneaker" / "cmyk.jpg").shape == (30, 30, 3)
    # A second scan reads the cache, and nothing in the folder changed.
    again = scan_folder(root, val_split=0.3)
    # Cached: every file decoded the first time (the images, and the 4 bad ones with an image
    # extension: truncated, zero bytes, text, bomb).
    assert again.report.cached == again.report.images + 4
    assert again.train == split.train and again.report.skipped == report.skipped
    assert _digests(root) == before


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
