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
    """Replace the folder ``path`` with one that ``fill`` writes, never leaving a partial one.

    ``fill`` writes into a temporary folder beside ``path``; only when it returns is the old
    folder (if any) renamed aside, the new one renamed into place and the old one removed. A
    reader sees the old folder, the new one, or (for the instant between the two renames) none,
    never a folder with some files missing.

    Args:
        path: The folder to write (its parent is created if missing).
        fill: Writes the folder's files into the path it is given.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old: Path | None = None
    try:
        fill(staging)
        for file in staging.rglob("*"):  # mkdtemp/mkstemp are private (0700/0600)
            if file.is_file():
                _sync(file)
                file.chmod(file_mode())
            elif file.is_dir():
                file.chmod(folder_mode())
        staging.chmod(folder_mode())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # an empty folder is replaced by the rename
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # put the previous folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _sync(file: Path) -> None:
    with file.open("rb+") as f:
        os.fsync(f.fileno())
