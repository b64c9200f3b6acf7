"""Folder -> dataset: find the classes and images of a folder-per-class tree and split them.

Layouts understood (class folders may hold images at any depth):

    root/<class>/*.png                      seeded, stratified train/val split (val_split)
    root/train/<class>/..., root/val/<class>/...   (``valid/`` works too; ``test/`` is left alone)

Every file is checked by content before use (:func:`check_files`: decoded in full, in parallel
threads, the result cached by path, size, modification and change time and inode): empty,
truncated or corrupt files, files that are not images, decompression bombs (over Pillow's pixel
limit), files that are not regular files (a FIFO, a device), hidden files and folders
(``.DS_Store``, ``.ipynb_checkpoints/``...) and finetune's own output (run folders, found by
their checkpoints, and folders holding only runs, such as ``runs/``) are skipped and listed in a
:class:`ScanReport` with the reason; tiny images and symlinks are kept and noted; identical files
(by SHA-1 of the content) in train and val, or in two classes, are reported as leakage. Nothing in
the user's folder is ever written.

The random split puts at least one image of every class on each side; a class with a single
readable image cannot be split and is an error (give ``train/`` and ``val/`` folders to train a
class without validation images).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import statistics
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from finetune.config import CHECKPOINT_NAMES, IMBALANCED_FROM
from finetune.data.caches import cache_root
from finetune.data.images import (
    IMAGE_EXTENSIONS,
    _is_hidden,
    file_kind,
    read_image_bytes,
    unsupported_format,
)
from finetune.errors import DataError
from finetune.files import atomic_write

if TYPE_CHECKING:
    pass

__all__ = [
    "TINY_SIDE",
    "DatasetSplit",
    "FileCheck",
    "Sample",
    "ScanReport",
    "check_file",
    "check_files",
    "scan_folder",
]
_VAL_NAMES = ("val", "valid", "validation")
TINY_SIDE = 16  # images with a side below this many pixels are noted (kept, upscaled)
# Bump when check_file's verdicts or the cache key change, to invalidate cached scans. 2: the
# key holds the change time and inode too (an image rewritten with its size and mtime restored
# was taken from the cache).
_SCAN_VERSION = 2
# A run folder holds one of these checkpoints (the names finetune.run.layout.RunDir gives them;
# data/ sits below run/, so they are built from the config's checkpoint names, as RunDir does).
_RUN_CHECKPOINTS = tuple(f"{name}.pt" for name in CHECKPOINT_NAMES)


@dataclass(frozen=True)
class Sample:
    """One image file and the index of its class (and, from a scan, what the file holds)."""

    path: Path
    label: int
    digest: str = ""  # SHA-1 of the content ("" when not scanned): the decoded cache's key
    width: int = 0  # pixels (0 when not scanned)
    height: int = 0


@dataclass(frozen=True)
class FileCheck:
    """What checking one file found."""

    path: Path
    problem: str | None = None  # why it cannot be used; None: a usable image
    width: int = 0
    height: int = 0
    digest: str = ""  # SHA-1 of the content ("" when it could not be read)
    note: str | None = None  # usable, but worth knowing: tiny, a symlink

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class ScanReport:
    """Everything scanning a folder found that a person should know."""

    root: Path
    files: int = 0  # files looked at (hidden ones included)
    images: int = 0  # usable images
    skipped: tuple[tuple[Path, str], ...] = ()  # (file or folder, why it is not used)
    notes: tuple[tuple[Path, str], ...] = ()  # (file or class folder, remark), used
    leaks: tuple[tuple[str, tuple[Path, ...]], ...] = ()  # (what, identical files)
    imbalance: float = 1.0  # largest class / smallest class, training images
    cached: int = 0  # files whose check came from the scan cache

    def summary(self) -> str:
        """One line for the screen."""
        parts = [f"checked {self.files} files: {self.images} images"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        if self.notes:
            parts.append(f"{len(self.notes)} noted")
        if self.leaks:
            parts.append(f"{len(self.leaks)} identical-file group(s) (leakage)")
        if self.imbalance >= IMBALANCED_FROM:
            parts.append(f"classes imbalanced {self.imbalance:.1f}x")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "files": self.files,
            "images": self.images,
            "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped],
            "notes": [{"path": str(p), "note": n} for p, n in self.notes],
            "leaks": [{"what": w, "paths": [str(p) for p in ps]} for w, ps in self.leaks],
            "imbalance": self.imbalance,
        }

    def text(self) -> str:
        """The full report, for ``finetune check`` and people."""
        lines = [self.summary()]
        if self.skipped:
            lines += ["", "skipped:"] + [f"  {p}  ({r})" for p, r in self.skipped]
        if self.notes:
            lines += ["", "noted (used):"] + [f"  {p}  ({n})" for p, n in self.notes]
        if self.leaks:
            lines += ["", "identical files (leakage):"]
            for what, paths in self.leaks:
                lines.append(f"  {what}: " + ", ".join(str(p) for p in paths))
        return "\n".join(lines)


def check_file(path: str | Path) -> FileCheck:
    """Decode ``path`` in full (never trusting its extension) and say whether it is a usable image.

    A truncated image, a file of zero bytes, a file Pillow cannot read and an image whose pixel
    count is over Pillow's decompression-bomb limit are problems; a side under
    :data:`TINY_SIDE` pixels and a symlink are notes.
    """
    path = Path(path)
    note = f"symlink to {os.path.realpath(path)}" if path.is_symlink() else None
    try:
        data = read_image_bytes(path)  # regular files only, size-capped, interruptible
    except OSError as exc:
        return FileCheck(path, f"cannot be read ({exc.strerror or exc})")
    if not data:
        return FileCheck(path, "empty file (0 bytes)")
    digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return FileCheck(path, f"decompression bomb: {exc}", digest=digest)
    except UnidentifiedImageError:
        why = unsupported_format(data) or "not an image (Pillow does not recognise its content)"
        return FileCheck(path, why, digest=digest)
    except (OSError, ValueError, SyntaxError) as exc:
        return FileCheck(path, f"truncated or corrupt image ({exc})", digest=digest)
    if min(width, height) < TINY_SIDE:
        tiny = f"tiny image ({width}x{height} px), upscaled to the input size"
        note = f"{note}; {tiny}" if note else tiny
    return FileCheck(path, None, width, height, digest, note)


def check_files(paths: Sequence[Path], progress: bool = False) -> tuple[list[FileCheck], int]:
    """:func:`check_file` over ``paths`` in parallel threads (decoders release the GIL), with
    results cached under :func:`cache_root` by path, size, modification time, change time and
    inode (:func:`_cache_key`). A cache entry of the wrong shape is checked again.

    Returns:
        The checks in ``paths`` order, and how many came from the cache.
    """
    cache_file = cache_root() / "scan" / f"v{_SCAN_VERSION}.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError, RecursionError):
        cache = {}
    if not isinstance(cache, dict):  # valid JSON of another shape: an empty cache
        cache = {}
    results: dict[int, FileCheck] = {}
    todo: list[int] = []
    keys: list[str] = []
    for i, path in enumerate(paths):
        key = _cache_key(path)
        keys.append(key)
        hit = _cached_check(path, cache.get(key)) if key else None
        if hit is not None:
            results[i] = hit
        else:
            todo.append(i)
    workers = min(16, 2 * (os.cpu_count() or 1))
    pool = ThreadPoolExecutor(workers)
    try:
        checked = pool.map(check_file, [paths[i] for i in todo])
        bar = tqdm(checked, total=len(todo), desc="checking images", unit="file", leave=False,
                   disable=None if progress else True)  # fmt: skip
        for i, check in zip(todo, bar, strict=True):
            results[i] = check
    except BaseException:  # Ctrl-C: drop the files not started instead of checking them all
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if todo:
        for i in todo:
            if keys[i]:
                cache[keys[i]] = {k: v for k, v in asdict(results[i]).items() if k != "path"}
        _write_json_atomically(cache_file, cache)
    return [results[i] for i in range(len(paths))], len(paths) - len(todo)


def _cache_key(path: Path) -> str:
    """The scan cache's key of ``path``: its absolute path, size, modification time, change
    time, device and inode. The change time cannot be set back by a program (``os.utime`` sets
    it to now), so a file rewritten with its size and modification time restored gets a new
    key; so does one replaced by a rename. "" when the file cannot be looked at."""
    try:
        info = path.stat()
    except OSError:
        return ""
    return "|".join(
        str(v)
        for v in (
            os.path.abspath(path), info.st_size, info.st_mtime_ns, info.st_ctime_ns,
            info.st_dev, info.st_ino, path.is_symlink(),
        )
    )  # fmt: skip


def _cached_check(path: Path, entry: Any) -> FileCheck | None:
    """The cached check of ``path``, or None when ``entry`` is missing or not what
    :func:`check_files` writes (a damaged or hand-edited cache: checked again, never trusted)."""
    if not isinstance(entry, dict):
        return None
    problem, note = entry.get("problem"), entry.get("note")
    width, height, digest = entry.get("width"), entry.get("height"), entry.get("digest")
    if not (
        (problem is None or isinstance(problem, str))
        and (note is None or isinstance(note, str))
        and all(type(v) is int and v >= 0 for v in (width, height))
        and isinstance(digest, str)
        and (problem is not None or re.fullmatch(r"[0-9a-f]{40}", digest))
    ):
        return None
    return FileCheck(path, problem, width, height, digest, note)


def _write_json_atomically(file: Path, data: Any) -> None:
    """Best effort: a cache that cannot be written is only a slower next time. Not fsynced:
    a damaged cache file reads as an empty cache."""
    with contextlib.suppress(OSError):
        atomic_write(file, json.dumps(data), durable=False)


@dataclass(frozen=True)
class DatasetSplit:
    """The classes of a folder and its train and validation samples."""

    root: Path
    classes: tuple[str, ...]  # sorted class-folder names; label i is classes[i]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    layout: str  # "train/val folders" or "random split"
    skipped: tuple[tuple[Path, str], ...]  # (file, reason) for files that are not usable images
    median_side: int  # median of min(width, height) over the training images, in pixels
    report: ScanReport = field(default_factory=lambda: ScanReport(Path(".")))

    def counts(self, split: str) -> dict[str, int]:
        """Images per class in ``"train"`` or ``"val"``."""
        samples = self.train if split == "train" else self.val
        counts = dict.fromkeys(self.classes, 0)
        for s in samples:
            counts[self.classes[s.label]] += 1
        return counts


def _run_checkpoint(folder: Path) -> str | None:
    """The name of a finetune checkpoint ``folder`` holds (then it is a run folder: ``fit``'s
    output, ``trial-NN`` of a tune), else None."""
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file())
    except OSError:
        return None
    return next((n for n in names if n in _RUN_CHECKPOINTS), None)


def _output_folder(folder: Path) -> str | None:
    """Why ``folder`` is finetune's output and not data, else None: a run folder, or a folder
    that holds run folders (a run root such as ``runs/``, a tune folder)."""
    checkpoint = _run_checkpoint(folder)
    if checkpoint is not None:
        return f"a finetune run folder (holds {checkpoint}), not data"
    try:
        subfolders = sorted(e.path for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
    except OSError:
        return None
    runs = [Path(p).name for p in subfolders if _run_checkpoint(Path(p)) is not None]
    if runs:
        more = ", ..." if len(runs) > 3 else ""
        return f"holds finetune run folders ({', '.join(runs[:3])}{more}), not data"
    return None


def _class_files(class_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The candidate image files below ``class_dir``, and the entries passed over, with why.

    Hidden entries, finetune's output below the class folder (:func:`_output_folder`) and files
    that are not regular files (a FIFO, a device: reading one could block or never end) are
    passed over; symlinked folders are not followed.
    """
    candidates: list[Path] = []
    passed: list[tuple[Path, str]] = []
    for here, dirs, files in os.walk(class_dir):
        base = Path(here)
        kept = []
        for name in dirs:
            path = base / name
            if name.startswith(".") or name == "__MACOSX":
                passed.append((path, "hidden folder, not read"))
            elif path.is_symlink():
                continue  # as Path.rglob: a symlinked folder is not followed
            elif (why := _output_folder(path)) is not None:
                passed.append((path, why))
            else:
                kept.append(name)
        dirs[:] = sorted(kept)
        for name in files:
            path = base / name
            if name.startswith(".") or name == "__MACOSX":
                passed.append((path, "hidden file, not read"))
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                try:
                    mode = path.stat().st_mode  # follows a symlink; never opens the file
                except OSError:
                    mode = stat.S_IFREG  # e.g. a broken symlink: check_file says why
                if stat.S_ISREG(mode):
                    candidates.append(path)
                else:
                    passed.append((path, f"{file_kind(mode)}, not read"))
            elif name.lower() in {"thumbs.db", "desktop.ini"}:
                passed.append((path, "system file, not an image"))
            else:
                kind = f"extension {path.suffix}" if path.suffix else "no extension"
                passed.append((path, f"not an image file ({kind})"))
    return sorted(candidates), sorted(passed)


def _class_folders_of(folder: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """Class names (non-hidden sub-folders with image files) and what was passed over: a run
    folder, or a folder holding only run folders, is finetune's output, never a class."""
    names: list[str] = []
    passed: list[tuple[Path, str]] = []
    for entry in sorted(folder.iterdir()):
        if _is_hidden(entry):
            passed.append((entry, f"hidden {'folder' if entry.is_dir() else 'file'}, not read"))
        elif entry.is_dir():
            if (run := _run_checkpoint(entry)) is not None:
                passed.append((entry, f"a finetune run folder (holds {run}): not a class"))
                continue
            images, inside = _class_files(entry)
            if images:
                names.append(entry.name)
            elif any("finetune run folder" in why for _, why in inside):
                passed.append((entry, "holds only finetune run folders (output): not a class"))
            else:
                passed.append((entry, "class folder without images: not a class"))
        else:
            passed.append((entry, "a file beside the class folders, not in any class"))
    return names, passed


@dataclass
class _Scan:
    """What scanning collects on its way through the folders."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)  # "train"/"val"/"all"
    checks: dict[Path, FileCheck] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[tuple[Path, str]] = field(default_factory=list)  # about classes, not files
    files: int = 0
    cached: int = 0

    def collect(self, part: str, folder: Path, classes: Sequence[str], progress: bool) -> None:
        found: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            if not (folder / name).is_dir():
                continue
            candidates, passed = _class_files(folder / name)
            self.skipped += passed
            self.files += len(candidates) + len(passed)
            found += [(path, label) for path in candidates]
        checks, cached = check_files([path for path, _ in found], progress)
        self.cached += cached
        samples = []
        for (path, label), check in zip(found, checks, strict=True):
            self.checks[path] = check
            if check.ok:
                samples.append(Sample(path, label, check.digest, check.width, check.height))
            else:
                self.skipped.append((path, check.problem))
        self.samples[part] = samples


def _leaks(
    parts: dict[str, list[Sample]], checks: dict[Path, FileCheck], classes: Sequence[str]
) -> list[tuple[str, tuple[Path, ...]]]:
    """Groups of identical files (same SHA-1) that sit in train and val, or in two classes."""
    groups: dict[str, list[tuple[str, Sample]]] = {}
    for part, samples in parts.items():
        for sample in samples:
            groups.setdefault(checks[sample.path].digest, []).append((part, sample))
    leaks = []
    for members in groups.values():
        where = {part for part, _ in members}
        labels = sorted({s.label for _, s in members})
        paths = tuple(sorted(s.path for _, s in members))
        if len(labels) > 1:
            names = " and ".join(classes[i] for i in labels)
            leaks.append((f"the same image in classes {names}", paths))
        elif len(where) > 1:
            leaks.append(("the same image in train and val", paths))
    return sorted(leaks, key=lambda leak: leak[1])


def scan_folder(
    root: str | Path, val_split: float = 0.2, seed: int = 0, progress: bool = False
) -> DatasetSplit:
    """Find the classes and images under ``root``, check every file, split train and val.

    Args:
        root: A folder-per-class tree, or a folder holding ``train/`` and ``val/`` trees.
        val_split: Fraction of each class held out for validation when there is no ``val/``.
        seed: Seed of the stratified split.
        progress: Show a progress bar while files are checked.

    Returns:
        The split; its ``report`` lists skipped files, notes and leakage.

    Raises:
        DataError: The folder is missing, has fewer than two classes, or a class is too small.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder. Give a folder with one sub-folder per class.")
    scan = _Scan()
    val_dir = next((root / n for n in _VAL_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        scan.skipped += _beside_train_and_val(root, val_dir)
        classes, passed = _class_folders_of(root / "train")
        scan.skipped += passed
        scan.files += len(passed)
        _check_classes(root / "train", classes)
        val_classes, val_passed = _class_folders_of(val_dir)
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise DataError(
                f"{val_dir} has class folders that {root / 'train'} lacks: {', '.join(extra)}. "
                "Every validation class needs training images: add them to train/ or remove them."
            )
        scan.skipped += val_passed
        scan.files += len(val_passed)
        scan.collect("train", root / "train", classes, progress)
        scan.collect("val", val_dir, classes, progress)
        train, val = scan.samples["train"], scan.samples["val"]
        layout = "train/val folders"
        _check_train_images(root / "train", classes, train)
        scan.notes += _without_validation(val_dir, classes, val)
    else:
        classes, passed = _class_folders_of(root)
        scan.skipped += passed
        scan.files += len(passed)
        _check_classes(root, classes)
        scan.collect("all", root, classes, progress)
        train, val = _split(root, scan.samples["all"], classes, val_split, seed)
        layout = "random split"
    if not val:
        raise DataError(f"{val_dir or root} has no usable validation images.")
    counts = np.bincount([s.label for s in train], minlength=len(classes))
    report = ScanReport(
        root=root,
        files=scan.files,
        images=len(train) + len(val),
        skipped=tuple(scan.skipped),
        notes=tuple([(p, c.note) for p, c in scan.checks.items() if c.ok and c.note] + scan.notes),
        leaks=tuple(_leaks({"train": train, "val": val}, scan.checks, classes)),
        imbalance=float(counts.max() / max(counts.min(), 1)),
        cached=scan.cached,
    )
    sides = [min(scan.checks[s.path].width, scan.checks[s.path].height) for s in train]
    return DatasetSplit(
        root=root,
        classes=tuple(classes),
        train=tuple(train),
        val=tuple(val),
        layout=layout,
        skipped=tuple(scan.skipped),
        median_side=int(statistics.median(sides)) if sides else 0,
        report=report,
    )


def _check_classes(root: Path, classes: Sequence[str]) -> None:
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(
            f"{root} needs at least two class folders with images (found {found}). "
            "Put each class's images in its own sub-folder, e.g. root/cat/*.jpg, root/dog/*.jpg."
        )


def _beside_train_and_val(root: Path, val_dir: Path) -> list[tuple[Path, str]]:
    """What sits in ``root`` beside ``train/`` and ``val/`` and is not read (``test/`` aside):
    a class folder put there by mistake is said, not silently left out."""
    passed = []
    for entry in sorted(root.iterdir()):
        if entry.name in ("train", "test") or entry == val_dir or _is_hidden(entry):
            continue
        if entry.is_dir() and entry.name in _VAL_NAMES:
            why = f"a second validation folder beside {val_dir.name}/, not read"
        elif entry.is_dir():
            why = "a folder beside train/ and val/, not read (classes go in train/ and val/)"
        else:
            why = "a file beside train/ and val/, not read"
        passed.append((entry, why))
    return passed


def _check_train_images(folder: Path, classes: Sequence[str], train: Sequence[Sample]) -> None:
    """Every class needs a usable training image (its files may all have been skipped)."""
    counts = np.bincount([s.label for s in train], minlength=len(classes))
    empty = [classes[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(
            f"{folder}: class(es) {', '.join(empty)} have no readable training image (see "
            f"`finetune check {folder.parent}` for why each file was skipped). Add images."
        )


def _without_validation(
    val_dir: Path, classes: Sequence[str], val: Sequence[Sample]
) -> list[tuple[Path, str]]:
    """A note per class that ``val_dir`` gives no usable image: it is trained, not measured."""
    counts = np.bincount([s.label for s in val], minlength=len(classes))
    return [
        (val_dir / classes[i], f"class {classes[i]} has no validation image: trained, not measured")
        for i, n in enumerate(counts)
        if n == 0
    ]


def _split(
    root: Path, samples: list[Sample], classes: Sequence[str], val_split: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """A seeded, stratified split with at least one image of every class on each side.

    scikit-learn's stratified split decides first; only where it left a class without a
    training or a validation image (tiny classes beside big ones) is one image of that class
    moved across (seeded), so folders that split well before split exactly as before.

    Raises:
        DataError: A class has fewer than two readable images: it cannot be on both sides.
    """
    labels = [s.label for s in samples]
    counts = np.bincount(labels, minlength=len(classes))
    small = [f"{classes[i]} ({n})" for i, n in enumerate(counts) if n < 2]
    if small:
        raise DataError(
            f"Cannot split {root} into train and val: class(es) {', '.join(small)} have fewer than "
            "2 readable images, and the random split puts at least one image of every class on "
            "each side. Add images, or give train/ and val/ folders yourself (a class may then "
            "have no validation images)."
        )
    # At least one validation image per class, and at most all but one image per class.
    n_val = min(max(round(val_split * len(samples)), len(classes)), len(samples) - len(classes))
    from sklearn.model_selection import train_test_split  # slow to import; only splits need it

    train, val = train_test_split(
        samples, test_size=n_val, random_state=seed, stratify=labels, shuffle=True
    )
    train, val = _both_sides(list(train), list(val), len(classes), seed)
    return sorted(train, key=lambda s: s.path), sorted(val, key=lambda s: s.path)


def _both_sides(
    train: list[Sample], val: list[Sample], n_classes: int, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Move one (seeded) image of each class missing from a side to it from the other side."""
    rng = np.random.default_rng(seed)
    for label in range(n_classes):
        for have, lack in ((train, val), (val, train)):
            if any(s.label == label for s in lack):
                continue
            mine = sorted((s for s in have if s.label == label), key=lambda s: s.path)
            moved = mine[int(rng.integers(len(mine)))]
            have.remove(moved)
            lack.append(moved)
    return train, val


def iter_image_files(folder: Path) -> list[Path]:
    """All files below ``folder`` with an image extension, sorted, hidden entries excluded."""
    return _class_files(folder)[0]
