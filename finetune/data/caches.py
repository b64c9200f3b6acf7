"""The cache folders under one root (``FINETUNE_CACHE_DIR``): where they are, what each holds,
how much space they take, and clearing them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import ConfigError

if TYPE_CHECKING:
    pass

__all__ = ["CACHES", "CacheUsage", "cache_root", "cache_usage", "clear_cache"]


CACHES = {  # the folders under cache_root() and what each holds
    "decoded": "images decoded and resized once (fit --no-cache-images: none)",
    "features": "frozen-backbone features (linear, stage-probe; --no-feature-cache: none)",
    "scan": "file checks, by path, size, modification and change time, and inode",
}


@dataclass(frozen=True)
class CacheUsage:
    """What one cache folder holds."""

    name: str  # a key of CACHES
    folder: Path
    files: int
    bytes: int


def cache_usage() -> list[CacheUsage]:
    """Files and disk space of each cache under :func:`finetune.data.caches.cache_root`
    (``$FINETUNE_CACHE_DIR``, else ``~/.cache/finetune``)."""
    usage = []
    for name in CACHES:
        folder = cache_root() / name
        sizes = [f.stat().st_size for f in folder.rglob("*") if f.is_file()]
        usage.append(CacheUsage(name, folder, len(sizes), sum(sizes)))
    return usage


def clear_cache(names: Sequence[str] = tuple(CACHES)) -> int:
    """Delete the named caches (every one by default); the bytes freed. Runs never need them:
    what they hold is computed again when missing.

    Raises:
        ConfigError: A name that is not a cache.
    """
    unknown = sorted(set(names) - set(CACHES))
    if unknown:
        raise ConfigError(f"Unknown cache {', '.join(unknown)}; choose from {', '.join(CACHES)}.")
    freed = 0
    for usage in cache_usage():
        if usage.name in names:
            shutil.rmtree(usage.folder, ignore_errors=True)
            freed += usage.bytes
    return freed


def cache_root() -> Path:
    """Where finetune caches things: ``$FINETUNE_CACHE_DIR``, else ``~/.cache/finetune``."""
    root = os.environ.get("FINETUNE_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune"
