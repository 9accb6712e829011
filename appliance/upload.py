"""Copy files to the guest over SFTP: fast, verified, skipped when already there.

One transport, the build's own Paramiko session: a large file (the k3s binary, the air-gap
image bundle) goes up in big pipelined SFTP write requests (Paramiko's plain
``SFTPFile.write`` waits for each request's answer; pipelined, it keeps many in flight) over
a session with large windows, with a progress bar. It is written under a temporary name,
checked by size and by ``sha256sum`` on the guest, and only then renamed into place, so a
half-sent file never sits under the final name. When the guest already holds a file of the
same size and sha256, nothing is sent. OpenSSH ``scp`` was a second transport for big files
until ``benchmarks/sftp_upload.py`` showed no end-to-end gain at the sizes the appliance
uploads (docs/provisioning.md, "Uploads").
"""

from __future__ import annotations

import hashlib
import posixpath
import shlex
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import paramiko

from appliance.digest import sha256_file
from appliance.errors import ConnectionLost, RemoteError
from appliance.log import human_size, log
from appliance.ssh import RemoteSession

# Bytes per SFTP write request: exactly 8 full SSH packets of OpenSSH's session channel
# (32 KiB max packet, less Paramiko's 64-byte margin), less the 29-byte request header,
# and under sftp-server's 256 KiB message limit. Measured best of 32 KiB..256 KiB here.
REQUEST_SIZE = 8 * (32768 - 64) - 29
READ_SIZE = 4 * 1024 * 1024
# Files at least this big get a progress bar.
PROGRESS_MIN_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class UploadResult:
    local: Path
    remote: str
    size: int
    sha256: str
    skipped: bool
    seconds: float

    @property
    def bytes_per_second(self) -> float:
        return self.size / self.seconds if self.seconds > 0 else 0.0


def remote_sha256(session: RemoteSession, paths: Sequence[str], *, sudo: bool = False) -> dict[str, str]:
    """sha256 of each existing file in ``paths`` on the guest (missing files are left out)."""
    if not paths:
        return {}
    quoted = " ".join(shlex.quote(p) for p in paths)
    result = session.run(f"sha256sum -- {quoted} 2>/dev/null || true", sudo=sudo, timeout=3600)
    sums: dict[str, str] = {}
    for line in result.stdout.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name:
            sums[name] = digest
    return sums


def upload_file(
    session: RemoteSession,
    local: Path,
    remote: str,
    *,
    mode: int | None = None,
    progress: bool | None = None,
    skip_identical: bool = True,
    request_size: int = REQUEST_SIZE,
) -> UploadResult:
    """Upload ``local`` to ``remote`` (an absolute guest path in a directory the login user can write).

    Skipped when the guest file has the same size and sha256. Raises ``RemoteError`` if the
    copy on the guest does not match afterwards.
    """
    started = time.monotonic()
    size = local.stat().st_size
    sftp = session.sftp()
    local_sum: str | None = None
    if skip_identical and _remote_size(sftp, remote) == size:
        local_sum = sha256_file(local)
        if remote_sha256(session, [remote]).get(remote) == local_sum:
            log.info(f"ok: {remote} already on the guest ({human_size(size)}, sha256 matches)")
            return UploadResult(local, remote, size, local_sum, True, time.monotonic() - started)
    partial = posixpath.join(posixpath.dirname(remote), "." + posixpath.basename(remote) + ".part")
    show = progress if progress is not None else size >= PROGRESS_MIN_BYTES
    try:
        sent_sum = _send(sftp, local, partial, size, request_size, show)
        if local_sum is not None and sent_sum != local_sum:
            raise RemoteError(f"{local} changed while it was being uploaded")
        remote_size = _remote_size(sftp, partial)
        if remote_size != size:
            raise RemoteError(
                f"upload of {local} to {remote} is incomplete: {remote_size} of {size} bytes arrived"
            )
        guest_sum = remote_sha256(session, [partial]).get(partial)
        if guest_sum != sent_sum:
            raise RemoteError(
                f"upload of {local} to {remote} is corrupt: "
                f"sha256 on the guest is {guest_sum}, expected {sent_sum}"
            )
        if mode is not None:
            sftp.chmod(partial, mode)
        sftp.posix_rename(partial, remote)
    except (OSError, EOFError, paramiko.SSHException) as exc:
        if session.link_lost():
            raise ConnectionLost(
                f"the connection dropped while uploading {local} to {remote}: {exc}"
            ) from None
        _remove_quietly(sftp, partial)
        raise RemoteError(f"cannot upload {local} to {session.endpoint.host}:{remote}: {exc}") from None
    except RemoteError:
        _remove_quietly(sftp, partial)
        raise
    seconds = time.monotonic() - started
    log.debug(f"uploaded {local} -> {remote}: {human_size(size)} in {seconds:.1f} s")
    return UploadResult(local, remote, size, sent_sum, False, seconds)


def upload_files(session: RemoteSession, pairs: Sequence[tuple[Path, str]], *, mode: int = 0o644) -> None:
    """Upload small files (scripts, units) unconditionally, then check all their sha256 in one command."""
    sftp = session.sftp()
    expected: dict[str, str] = {}
    try:
        for local, remote in pairs:
            expected[remote] = _send(sftp, local, remote, local.stat().st_size, REQUEST_SIZE, False)
            sftp.chmod(remote, mode)
    except (OSError, EOFError, paramiko.SSHException) as exc:
        if session.link_lost():
            raise ConnectionLost(f"the connection dropped while uploading files: {exc}") from None
        raise RemoteError(f"cannot upload files to {session.endpoint.host}: {exc}") from None
    actual = remote_sha256(session, list(expected))
    bad = [r for r, digest in expected.items() if actual.get(r) != digest]
    if bad:
        raise RemoteError(f"uploaded files differ on the guest (sha256 mismatch): {', '.join(bad)}")


def ensure_remote_dir(session: RemoteSession, path: str) -> None:
    """Create ``path`` on the guest, owned by the login user (so SFTP can write into it)."""
    user = shlex.quote(session.endpoint.user)
    quoted = shlex.quote(path)
    session.run(f"install -d -m 0755 -o {user} {quoted}", timeout=60)


def _send(
    sftp: paramiko.SFTPClient, local: Path, remote: str, size: int, request_size: int, show: bool
) -> str:
    """Write ``local`` to ``remote`` with pipelined requests; return the sha256 of what was sent."""
    digest = hashlib.sha256()
    # Hashing runs beside the sending (hashlib releases the GIL), one chunk behind at most.
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-sha256")
    pending: Future[None] | None = None
    dst = sftp.open(remote, "wb", bufsize=0)
    finished = False
    try:
        with local.open("rb") as src, log.transfer(f"upload {local.name}", size, show=show) as advance:
            dst.set_pipelined(True)
            # Big write requests instead of Paramiko's 32 KiB: fewer requests, fewer answers.
            dst.MAX_REQUEST_SIZE = request_size
            while chunk := src.read(READ_SIZE):
                if pending is not None:
                    pending.result()
                pending = hasher.submit(digest.update, chunk)
                dst.write(chunk)
                advance(len(chunk))
            if pending is not None:
                pending.result()
        finished = True
    finally:
        hasher.shutdown(wait=True)
        if finished:
            dst.close()  # waits for the pipelined acknowledgements (bounded by SFTP_IDLE_TIMEOUT)
        else:
            # Interrupted or failed mid-stream: a graceful close would wait for answers to every
            # request still in flight, on a stream that may be cut mid-packet (it hung on Ctrl-C).
            # Drop the SFTP channel instead; the session opens a new one when needed.
            _abandon(sftp, dst)
    return digest.hexdigest()


def _abandon(sftp: paramiko.SFTPClient, dst: paramiko.SFTPFile) -> None:
    dst._closed = True  # type: ignore[attr-defined]  # else Paramiko sends a close request when collected
    channel = sftp.get_channel()
    if channel is not None:
        channel.close()


def _remote_size(sftp: paramiko.SFTPClient, path: str) -> int | None:
    try:
        return sftp.stat(path).st_size
    except FileNotFoundError:
        return None


def _remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except (OSError, EOFError, paramiko.SSHException):
        pass
