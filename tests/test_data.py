"""Folder scanning, splitting and decoding on real images and deliberately messy folders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.features
import pytest
from PIL import Image

from finetune.data.images import load_image, read_image_bytes
from finetune.data.loaders import ImageDataset, collate_skipping_failed
from finetune.data.scan import check_file, scan_folder
from finetune.errors import DataError
from finetune.run.layout import RunDir, TuneDir

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


def test_the_random_split_puts_every_class_on_both_sides(tmp_path: Path) -> None:
    """A tiny class beside a big one: scikit-learn's stratified split alone gave the tiny class
    no validation image (val_split 0.2) or no training image (val_split 0.8)."""
    data = copy_classes(tmp_path / "d", ["bag"], 2)
    copy_classes(data, ["coat"], 30)
    for val_split in (0.2, 0.5, 0.8, 0.95):
        for seed in range(3):
            split = scan_folder(data, val_split=val_split, seed=seed)
            assert min(split.counts("train").values()) >= 1, (val_split, seed)
            assert min(split.counts("val").values()) >= 1, (val_split, seed)
            assert len(split.train) + len(split.val) == 32
    # A class with a single image cannot be on both sides: a clear error naming it.
    copy_classes(tmp_path / "one", ["bag"], 1)
    copy_classes(tmp_path / "one", ["coat"], 30)
    with pytest.raises(DataError, match=r"bag \(1\).*train/ and val/"):
        scan_folder(tmp_path / "one")


def test_a_rewritten_image_with_its_size_and_mtime_restored_is_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    data = copy_classes(tmp_path / "d", ["bag", "coat"], 4)
    victim = data / "bag" / "x.bmp"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(victim)  # BMP: the same size for any colour
    before = {s.path: s.digest for s in scan_folder(data).train + scan_folder(data).val}
    info = victim.stat()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(victim)
    os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert victim.stat().st_size == info.st_size and victim.stat().st_mtime_ns == info.st_mtime_ns
    split = scan_folder(data)
    after = {s.path: s.digest for s in split.train + split.val}
    assert after[victim] == hashlib.sha1(victim.read_bytes()).hexdigest() != before[victim]


def test_a_damaged_scan_cache_of_any_shape_is_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    data = copy_classes(tmp_path / "d", ["bag", "coat"], 4)
    fresh = scan_folder(data)
    (cache_file,) = (tmp_path / "cache" / "scan").glob("*.json")
    entries = json.loads(cache_file.read_text())
    wrong_values = ["text", 5, None, [1, 2], {}, {"width": "x", "height": 1}, {"bogus": 1}]
    damaged: list[object] = [[], "text", 3, None, {k: {"digest": 7} for k in entries}]
    damaged += [dict.fromkeys(entries, bad) for bad in wrong_values]
    for content in damaged:
        cache_file.write_text(json.dumps(content))
        split = scan_folder(data)
        assert split.train == fresh.train and split.val == fresh.val, content
        assert not split.report.skipped, content  # never blamed on an image
    cache_file.write_text('{"a": ' * 100_000)  # nested too deep for json
    assert scan_folder(data).train == fresh.train


@pytest.mark.timeout(30, method="thread")  # a regression blocks on the FIFO: fail, never hang
def test_fifos_devices_and_oversized_files_are_never_read(tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "d", ["bag", "coat"], 3)
    fifo, device = data / "bag" / "x.png", data / "coat" / "zero.png"
    os.mkfifo(fifo)  # no writer: opening it for reading would block forever
    os.symlink("/dev/zero", device)  # endless
    split = scan_folder(data)
    reasons = {p.name: why for p, why in split.report.skipped}
    assert "FIFO" in reasons["x.png"] and "character device" in reasons["zero.png"]
    assert len(split.train) + len(split.val) == 6
    for path, kind in ((fifo, "FIFO"), (device, "character device")):
        assert kind in (check_file(path).problem or "")
        with pytest.raises(OSError, match=kind):
            load_image(path)
    with pytest.raises(OSError, match="byte limit"):
        read_image_bytes(split.train[0].path, limit=10)


def test_finetune_output_inside_the_data_is_never_a_class(tmp_path: Path) -> None:
    """`finetune fit .` run inside the data folder puts runs/ there; the next scan must not
    train a class named "runs" from the report's pictures."""
    data = copy_classes(tmp_path / "d", ["bag", "coat"], 4)
    picture = next((data / "bag").glob("*.png")).read_bytes()

    def fake_run(folder: Path) -> RunDir:
        run = RunDir(folder)
        run.path.mkdir(parents=True)
        for file in (run.best, run.config, run.metrics):
            file.write_bytes(b"{}")
        for png in (run.curves, run.augment_preview):
            png.write_bytes(picture)  # a report's pictures are real images
        return run

    fake_run(data / "runs" / "d-linear-20261203-120000")
    tune = TuneDir(data / "runs" / "tune-1")
    fake_run(tune.trial(0, 2).path)
    tune.plot.write_bytes(picture)
    fake_run(data / "out")  # fit --out d/out
    fake_run(data / "bag" / "run-in-a-class")
    split = scan_folder(data)
    assert split.classes == ("bag", "coat")
    assert len(split.train) + len(split.val) == 8  # the class keeps its own images
    reasons = {p.relative_to(data).as_posix(): why for p, why in split.report.skipped}
    assert "run folder" in reasons["out"] and "run folder" in reasons["bag/run-in-a-class"]
    assert "only finetune run folders" in reasons["runs"]
    # The same with train/ and val/ folders.
    tv = tmp_path / "tv"
    copy_classes(tv / "train", ["bag", "coat"], 3)
    copy_classes(tv / "val", ["bag", "coat"], 2, split="val")
    fake_run(tv / "train" / "runs" / "x")
    fake_run(tv / "val" / "y")
    assert scan_folder(tv).classes == ("bag", "coat")


def test_what_train_and_val_folders_leave_out_is_said(tmp_path: Path) -> None:
    root = tmp_path / "tv"
    copy_classes(root / "train", ["bag", "coat", "dress"], 3)
    copy_classes(root / "val", ["bag", "coat"], 2, split="val")
    copy_classes(root, ["sandal"], 2)  # a class folder beside train/ and val/ by mistake
    copy_classes(root / "test", ["bag"], 1)  # left alone, as always
    split = scan_folder(root)
    skipped = {p.name: why for p, why in split.report.skipped}
    assert "beside train/ and val/" in skipped["sandal"] and "test" not in skipped
    notes = {p.name: n for p, n in split.report.notes}
    assert "no validation image" in notes["dress"]
    assert "sandal" in split.report.text() and "dress" in split.report.text()
    # A class whose training files are all unreadable is an error, not a class never trained.
    for path in (root / "train" / "dress").iterdir():
        path.write_bytes(b"")
    with pytest.raises(DataError, match="dress"):
        scan_folder(root)


def test_float_images_are_scaled_not_clamped(tmp_path: Path) -> None:
    ramp = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit.tif")
    unit = load_image(tmp_path / "unit.tif")
    assert unit.dtype == np.uint8 and unit.min() == 0 and unit.max() == 255
    assert len(np.unique(unit)) > 200  # a ramp, not black
    wide = ramp * 4000.0 - 1000.0  # another range: stretched from its min to its max
    wide[0, 0] = np.nan
    Image.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
    out = load_image(tmp_path / "wide.tif")
    assert out[0, 0, 0] == 0 and out.max() == 255 and len(np.unique(out)) > 200


def test_an_image_format_this_pillow_cannot_decode_is_named(tmp_path: Path) -> None:
    heic = tmp_path / "photo.heic"  # an ISO-BMFF header with the HEIC brand
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    problem = check_file(heic).problem or ""
    assert "HEIC" in problem and "this Pillow build" in problem
    with pytest.raises(OSError, match="HEIC"):
        load_image(heic)
    data = copy_classes(tmp_path / "d", ["bag", "coat"], 3)
    (data / "bag" / "photo.heic").write_bytes(heic.read_bytes())
    reasons = {p.name: why for p, why in scan_folder(data).report.skipped}
    assert "HEIC" in reasons["photo.heic"]  # not "not an image file (extension .heic)"
    if PIL.features.check("avif"):  # a Pillow that decodes AVIF: an AVIF file is an image
        Image.new("RGB", (32, 32), (0, 128, 0)).save(data / "coat" / "green.avif")
        used = {s.path.name for s in scan_folder(data).train + scan_folder(data).val}
        assert "green.avif" in used
