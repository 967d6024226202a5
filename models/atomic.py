"""Atomic file writes: the one way dmqbench writes a file a crash, a kill or a full disk must not leave half-done.

:func:`atomic_path` yields a temporary path beside the target (same directory, so ``os.replace`` is atomic;
per process and thread, so concurrent jobs never share one; same suffix, so ``np.savez`` adds nothing);
on success it replaces the target, on any failure it removes the temporary and the old file stays intact.
A full disk becomes :class:`DiskFullError`, whose message is one line naming the file and the space needed.

It lives in ``models/`` because that is the bottom layer: ``harness`` and ``methods`` both import it, and
``models`` imports neither.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 1024:,.0f} KiB"


class DiskFullError(OSError):
    """No space left writing ``path``; ``str(e)`` is one line naming the file and the bytes still needed."""

    def __init__(self, path: str | Path, need_bytes: int, message: str | None = None) -> None:
        self.path, self.need_bytes = Path(path), int(need_bytes)
        if message is not None:  # the same error again, from its recorded text
            super().__init__(errno.ENOSPC, message)
            return
        try:
            st = os.statvfs(self.path.parent if self.path.parent.exists() else Path.cwd())
            free = f", {_size(st.f_bavail * st.f_frsize)} free"
        except OSError:
            free = ""
        super().__init__(errno.ENOSPC, f"disk full writing {self.path}: about {_size(self.need_bytes)} more needed"
                         f"{free}; free space there, then rerun the same command to resume")

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def atomic_path(path: str | Path, need_bytes: int | None = None) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: ``p`` holds the whole new content, or its old one.

    ``need_bytes`` goes into the :class:`DiskFullError` a full disk raises (default: what was written plus 1 MiB).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not isinstance(e, DiskFullError):
            raise DiskFullError(path, need_bytes if need_bytes is not None else written + 2**20) from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path, need_bytes=len(text.encode()) + 2**20) as tmp:
        tmp.write_text(text)
