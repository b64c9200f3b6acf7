"""Every file finetune writes is written atomically: a reader sees the old file or the new one,
never half of one.

A run is killed mid-epoch (Ctrl-C, a preempted GPU, an out-of-memory kill) and ``last.pt`` must
still load; two processes or DataLoader workers fill the same cache entry and a reader must not
memory-map a file another one is still writing. Both come down to one recipe, done here once:
write a temporary file in the target's folder (same file system, so the rename is atomic), make
it durable (``fsync``), then ``os.replace`` it onto the target; on any failure, Ctrl-C included,
the temporary file is removed and the target is left as it was. When several writers race on
one target, the last rename wins and each rename installs a whole file.

Torch-free on purpose: it sits at the bottom of the package (beside :mod:`finetune.errors`), so
the data caches can use it as well as checkpoints and reports.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_folder", "file_mode", "folder_mode"]

# What to write: the bytes or text themselves, or a function that writes them to an open
# binary file (``torch.save``, ``np.save``, ``figure.savefig(f, format="png")``...).
Content = bytes | str | Callable[[BinaryIO], object]


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file here (0666 less the umask);
    ``mkstemp`` makes 0600, which would hide a checkpoint from the rest of a team."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode a plain ``mkdir`` would give a new folder here (0777 less the umask)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    # The only way to read the umask is to set it; set it straight back.
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(
    path: str | Path, data: Content, *, durable: bool = True, encoding: str = "utf-8"
) -> Path:
    """Replace ``path`` with ``data`` in one step; the old file stays intact until then.

    Args:
        path: The file to write (its folder is created if missing).
        data: Bytes, text (encoded with ``encoding``), or a function given the open binary
            temporary file to write into.
        durable: ``fsync`` the file before the rename, so a power cut cannot leave an empty file
            under the new name. Caches pass ``False``: they check what they read and recompute a
            damaged entry, and an fsync per cached image would slow filling the cache down.
        encoding: For ``data`` given as text.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        OSError: The folder cannot be written (nothing is left behind); whatever ``data``'s
            function raises propagates the same way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode(encoding))
            elif isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: no temp file outlives a failed write
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_folder(path: str | Path, fill: Callable[[Path], object]) -> Path:
    """Write the files ``fill`` makes into the folder ``path``, replacing those names alone.

    ``fill`` writes into a fresh temporary folder beside ``path``. A new ``path`` is that folder
    renamed into place: a reader sees no folder or the whole one. An existing ``path`` keeps
    everything ``fill`` did not write: each file ``fill`` wrote is renamed onto its name inside
    it (each one whole), and the folder itself is never renamed or removed, so ``-o .`` or a
    folder holding the user's other files loses nothing. Deciding whether an existing folder may
    be written into at all is the caller's (``finetune export`` refuses one it did not write).

    Args:
        path: The folder to write (its parent is created if missing).
        fill: Writes the folder's files into the path it is given.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        OSError: The folder cannot be written, or one of ``fill``'s names is a folder there;
            the temporary folder is removed. Whatever ``fill`` raises propagates the same way.
    """
    path = Path(path)
    # Normalised ("." and ".." resolved without following links): "beside" must be the parent
    # of the folder itself, not a folder inside it.
    target = Path(os.path.abspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(staging)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        for file in staging.rglob("*"):  # mkdtemp/mkstemp are private (0700/0600)
            if file.is_file():
                _sync(file)
                file.chmod(file_mode())
            elif file.is_dir():
                file.chmod(folder_mode())
        staging.chmod(folder_mode())
        if target.exists() or target.is_symlink():
            _move_files_into(staging, files, target)
        else:  # nothing there: the whole folder moves in with one rename
            os.rename(staging, target)
    finally:  # the temporary folder never outlives the call, Ctrl-C included
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _move_files_into(staging: Path, files: list[Path], target: Path) -> None:
    """Rename each of ``files`` (inside ``staging``) onto the same name inside ``target``."""
    if not target.is_dir():
        raise NotADirectoryError(f"{target} is not a folder")
    for file in files:
        destination = target / file.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, destination)


def _sync(file: Path) -> None:
    with file.open("rb+") as f:
        os.fsync(f.fileno())
