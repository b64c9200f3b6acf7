"""Atomic writes: the target holds the old content or the new, never part of either."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pytest

from finetune.files import atomic_write, atomic_write_folder, file_mode, folder_mode


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_bytes_text_and_a_writer_function_are_written(tmp_path: Path) -> None:
    assert atomic_write(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    atomic_write(tmp_path / "b.txt", "héllo\n")
    atomic_write(tmp_path / "c.bin", lambda f: f.write(b"from a writer"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "c.bin").read_bytes() == b"from a writer"
    assert _names(tmp_path) == ["a.bin", "b.txt", "c.bin"]  # no temp file left behind


def test_replaces_the_old_file_with_ordinary_permissions(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "folder" / "f.json"  # the folder is created
    atomic_write(target, "old", durable=False)
    atomic_write(target, "new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == file_mode()  # not mkstemp's private 0600
    assert _names(target.parent) == ["f.json"]


def _fails_midway(exc: BaseException):
    def write(f: BinaryIO) -> None:
        f.write(b"half of the new")
        f.flush()
        raise exc

    return write


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_writer_that_fails_midway_leaves_the_old_file(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "last.pt"
    atomic_write(target, b"old and whole")
    with pytest.raises(type(exc)):
        atomic_write(target, _fails_midway(exc))
    assert target.read_bytes() == b"old and whole"
    assert _names(tmp_path) == ["last.pt"]


def test_a_failed_first_write_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "new.csv", _fails_midway(RuntimeError()))
    assert _names(tmp_path) == []


def test_concurrent_writers_each_install_a_whole_file(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "cache.npy"
    contents = [bytes([i]) * 100_000 for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda data: atomic_write(target, data, durable=False), contents))
    assert target.read_bytes() in contents  # the last rename won, whole
    assert _names(tmp_path) == ["cache.npy"]


def test_folders_are_staged_then_renamed(tmp_path: Path) -> None:
    target = tmp_path / "bundle"

    def fill(text: str):
        def write(folder: Path) -> None:
            (folder / "model.json").write_text(text)
            (folder / "sub").mkdir()
            (folder / "sub" / "x").write_text(text)

        return write

    atomic_write_folder(target, fill("one"))
    atomic_write_folder(target, fill("two"))  # replaces the earlier folder
    assert (target / "model.json").read_text() == "two"
    assert (target / "sub" / "x").read_text() == "two"
    assert target.stat().st_mode & 0o777 == folder_mode()
    assert (target / "model.json").stat().st_mode & 0o777 == file_mode()
    assert _names(tmp_path) == ["bundle"]


@pytest.mark.parametrize("exc", [RuntimeError("no space"), KeyboardInterrupt()])
def test_a_folder_that_fails_midway_leaves_the_old_one(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "bundle"
    atomic_write_folder(target, lambda folder: (folder / "model.json").write_text("old"))

    def fail(folder: Path) -> None:
        (folder / "model.json").write_text("half")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write_folder(target, fail)
    assert (target / "model.json").read_text() == "old"
    assert _names(tmp_path) == ["bundle"]


def test_a_folder_write_replaces_its_own_files_and_never_removes_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing into a folder that exists (``-o .`` included) replaces the names written and
    nothing else: the folder itself stays, with the user's files in it."""
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "model.json").write_text("old")
    atomic_write_folder(target, lambda folder: (folder / "model.json").write_text("new"))
    assert (target / "model.json").read_text() == "new"
    assert (target / "notes.txt").read_text() == "mine"
    assert _names(tmp_path) == ["bundle"]
    inode = target.stat().st_ino
    monkeypatch.chdir(target)
    assert atomic_write_folder(".", lambda folder: (folder / "model.json").write_text("dot"))
    assert target.stat().st_ino == inode  # the working directory was not swapped for another
    assert _names(target) == ["model.json", "notes.txt"]
    assert (target / "model.json").read_text() == "dot"
    assert _names(tmp_path) == ["bundle"]  # the temporary folder beside it is gone
