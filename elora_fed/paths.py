"""Where the toolkit caches converted models and prepared data, and how it writes there.

Every cache entry is a directory written under a temporary name and renamed into place
once complete, so an interrupted run never leaves a half-written entry behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """The cache directory: ``$ELORA_FED_CACHE``, else ``~/.cache/elora-fed``."""
    return Path(os.environ.get("ELORA_FED_CACHE", Path.home() / ".cache" / "elora-fed"))


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``final`` only if the block succeeds.

    The temporary directory is a sibling of ``final`` (same filesystem, so the rename is
    atomic). On any exception it is removed and ``final`` is left untouched. If another
    process completed ``final`` first, its copy is kept and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
