"""Writing files on the build host: whole or not at all, never through a planted name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` through a temporary file of our own in the same folder, then rename.

    The temporary file comes from ``mkstemp`` (a fresh name, opened exclusively), never a fixed
    name such as ``.values.yaml.tmp``: a symlink planted under a fixed name would redirect the
    write to its target. Readers see the old file or the new one; a failure leaves neither a
    temporary file nor a half-written target. ``mode`` is the file's final permission.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
