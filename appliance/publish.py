"""Publishing a build's files into the output folder as one set: all of them or none.

The set is the OVA, its ``.sha256`` and ``build-report.json``. Each is first written in full
under a temporary name of its own in the output folder (``mkstemp``: nothing a symlink could
redirect) and flushed to disk; only then are they renamed over their final names, with Ctrl-C
held back for those few renames, so nobody ever sees an OVA beside a ``.sha256`` or report of
another build. Any failure before the renames (a full disk above all, or Ctrl-C) removes the
temporary files and leaves what was published before untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import BinaryIO

from appliance.errors import HostFileError
from appliance.log import human_size

COPY_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class PublishedFile:
    """One member of the set: its final name in the folder and where its bytes come from."""

    name: str
    source: Path | None = None  # a file to copy...
    data: bytes | None = None  # ...or bytes to write
    sha256: str | None = None  # what the copy must hash to (the digest published beside it)
    # ...or bytes made when their turn comes, after the files before them are written in full (the build
    # report, so that it can say how the copy of the OVA went)
    produce: Callable[[], bytes] | None = None


def publish_set(folder: Path, files: Sequence[PublishedFile]) -> list[Path]:
    """Write ``files`` into ``folder`` as one set; return their final paths.

    Raises ``OSError`` (disk full, permissions), ``HostFileError`` (a source that no longer
    hashes to its ``sha256``) or ``KeyboardInterrupt``, each with nothing of the new set
    visible and no temporary file left behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder, [f.name for f in files])
    temps: list[tuple[Path, Path]] = []
    try:
        for f in files:
            fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{f.name}.", suffix=".partial")
            temps.append((Path(tmp_name), folder / f.name))
            with os.fdopen(fd, "wb") as out:
                _fill(out, f)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp_name, 0o644)  # published files are for everyone; mkstemp made it 0600
        with _ctrl_c_held_back():
            for tmp, final in temps:
                os.replace(tmp, final)
        temps = []
        _fsync_folder(folder)
    except OSError as exc:
        if exc.filename is None:  # a failed write names no file: name the set's folder
            raise OSError(exc.errno, exc.strerror, str(temps[-1][1] if temps else folder)) from exc
        raise
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    return [folder / f.name for f in files]


def _fill(out: BinaryIO, f: PublishedFile) -> None:
    if f.produce is not None:
        out.write(f.produce())
        return
    if f.source is None:
        out.write(f.data or b"")
        return
    digest = hashlib.sha256()
    with f.source.open("rb") as src:
        while chunk := src.read(COPY_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if f.sha256 is not None and digest.hexdigest() != f.sha256:
        raise HostFileError(
            f"{f.source} changed since it was verified (sha256 {digest.hexdigest()[:16]}..., "
            f"expected {f.sha256[:16]}...); nothing was published",
            hint="run `invoke build-ova` again: it exports and verifies afresh",
        )


def _remove_leftovers(folder: Path, names: Sequence[str]) -> None:
    """Temporary files of an earlier publish of these names that a hard kill left behind."""
    for name in names:
        for stale in folder.glob(f".{glob_escape(name)}.*.partial"):
            stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


@contextlib.contextmanager
def _ctrl_c_held_back() -> Iterator[None]:
    """Defer SIGINT (and SIGTERM, SIGHUP) over a short critical section, then deliver it as ``KeyboardInterrupt``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        raise KeyboardInterrupt


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing when ``folder`` cannot hold ``needed`` bytes (a clear early error)."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed:
        raise HostFileError(
            f"not enough space in {folder} for {what}: {human_size(needed)} needed, {human_size(free)} free",
            hint="free space there or set output.dir to a folder on a larger disk, then run the same command again",
        )
