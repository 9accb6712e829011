"""Open an input file only if it is a regular file, without ever blocking.

``open()`` on a FIFO blocks until a writer appears (forever, for a build); a directory or a
device is not a file a config, state, EULA or OVA can be. Every path the tool reads as input goes
through :func:`open_regular` (or :func:`read_regular`): ``stat`` first (nothing is opened that is
not a regular file), then ``open`` with ``O_NONBLOCK`` and ``fstat`` of what was opened (the path
may have been swapped in between), then blocking mode again for the reads.
"""

from __future__ import annotations

import fcntl
import io
import os
import stat
from pathlib import Path

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFile(OSError):
    """The path exists but is not a regular file; ``strerror`` says what it is."""


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: Path | str) -> io.BufferedReader:
    """``path`` opened for binary reading, or ``NotRegularFile`` / ``OSError`` (FileNotFoundError ...)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(0, f"{_kind(st.st_mode)}, not a regular file", str(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(0, f"{_kind(st.st_mode)}, not a regular file", str(path))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path | str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the regular file ``path`` (so a caller can tell "too big")."""
    with open_regular(path) as f:
        return f.read(limit + 1)


def describe(exc: OSError) -> str:
    """An ``OSError`` from the functions above as the end of one line: what is wrong with the path."""
    if isinstance(exc, NotRegularFile):
        return f"it is {exc.strerror}"
    return exc.strerror or str(exc)
