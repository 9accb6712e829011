#!/usr/bin/env python3
"""Upload end to end: our SFTP uploader against OpenSSH `scp`, same run, same server.

The appliance uploads a few large files once per build: the k3s binary (about 70 MB) and
its air-gap image bundle (a few hundred MB). For each size this starts from one loopback
OpenSSH server (the ssh test tier's fixture code), writes a file of random bytes and times,
per run, in alternating order:

- ours: ``appliance.upload.upload_file`` end to end on an open session (hash while sending,
  copy under a temporary name, size check, ``sha256sum`` on the guest, rename);
- the baseline: OpenSSH ``scp`` as a second transport would run it (a new ssh connection,
  strict host-key check against the session's known_hosts, the same key and cipher, the file
  hashed locally while scp reads it), followed by the same ``sha256sum`` on the guest.

It prints the median of each and the ratio of our throughput to scp's per size and for the
whole set (the sum of the medians: what a build pays). A ratio at or above ``SAME_WITHIN`` is
why the uploader has one transport (docs/provisioning.md).

Usage: python3 benchmarks/sftp_upload.py [--size-mib 70 400] [--runs 3] [--cipher aes128-gcm@openssh.com]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "ssh")]

from sshd_server import SSHServer, make_server  # noqa: E402

from appliance import upload  # noqa: E402
from appliance.digest import sha256_file  # noqa: E402
from appliance.run import run  # noqa: E402
from appliance.ssh import RemoteSession  # noqa: E402

# Ours/scp throughput ratio from which a second transport shows no gain worth its code.
SAME_WITHIN = 0.9
# The real upload set: the k3s binary and the air-gap image bundle.
REAL_SIZES_MIB = (70, 400)


def _random_file(path: Path, size_mib: int) -> None:
    block = os.urandom(1024 * 1024)
    with path.open("wb") as f:
        for i in range(size_mib):
            # Vary each MiB so nothing along the way can deduplicate or compress it.
            f.write(i.to_bytes(8, "little") + block[8:])


def _mb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def _ours(session: RemoteSession, source: Path, target: str) -> float:
    t0 = time.monotonic()
    upload.upload_file(session, source, target, progress=False, skip_identical=False)
    seconds = time.monotonic() - t0
    Path(target).unlink()
    return seconds


def _scp(session: RemoteSession, server: SSHServer, cipher: str, source: Path, target: str) -> float:
    argv = ["scp", "-B", "-q", "-P", str(server.port),
            "-o", f"UserKnownHostsFile={session.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", "Compression=no", "-c", cipher, "-i", str(server.ed25519_key),
            "--", str(source), f"{server.user}@127.0.0.1:{target}"]
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(sha256_file, source)  # hashed while scp reads the same file
        run(argv, timeout=None)
        sent = digest.result()
    on_guest = upload.remote_sha256(session, [target]).get(target)
    seconds = time.monotonic() - t0
    if on_guest != sent:
        raise SystemExit(f"scp copy differs: {on_guest} != {sent}")
    Path(target).unlink()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, nargs="+", default=list(REAL_SIZES_MIB))
    parser.add_argument("--cipher", default="aes128-gcm@openssh.com")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per size; the median is reported")
    args = parser.parse_args()

    rows: list[tuple[int, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="sftp-bench-") as tmp:
        work = Path(tmp)
        server = make_server(work / "sshd")
        try:
            dest_dir = work / "dest"
            dest_dir.mkdir()
            session = RemoteSession(
                server.endpoint(), known_hosts=work / "known_hosts", connect_timeout=10, connect_retries=2,
                ciphers=(args.cipher,),
            )
            with session:
                session.run("true")  # connect (and record the host key scp checks) before timing
                cipher = session.transport.remote_cipher
                for size_mib in args.size_mib:
                    source = work / "payload.bin"
                    _random_file(source, size_mib)
                    target = str(dest_dir / "payload.bin")
                    ours: list[float] = []
                    scp: list[float] = []
                    for i in range(args.runs):
                        if i % 2 == 0:
                            ours.append(_ours(session, source, target))
                            scp.append(_scp(session, server, args.cipher, source, target))
                        else:
                            scp.append(_scp(session, server, args.cipher, source, target))
                            ours.append(_ours(session, source, target))
                    rows.append((source.stat().st_size, statistics.median(ours), statistics.median(scp)))
                    source.unlink()
        finally:
            server.stop()

    print(f"end to end, verified on the guest (sha256sum); cipher {cipher}; loopback sshd; "
          f"{args.runs} run(s) per size, median")
    print(f"{'size':>9}  {'ours (Paramiko SFTP)':>22}  {'baseline (OpenSSH scp)':>22}  ratio ours/scp")
    worst = float("inf")
    for size, ours_s, scp_s in rows:
        ratio = scp_s / ours_s
        worst = min(worst, ratio)
        print(f"{size / 2**20:6.0f} MiB  {_mb_s(size, ours_s):8.1f} MB/s ({ours_s:6.2f} s)  "
              f"{_mb_s(size, scp_s):8.1f} MB/s ({scp_s:6.2f} s)  {ratio:8.2f}")
    total = sum(size for size, _, _ in rows)
    ours_total, scp_total = sum(o for _, o, _ in rows), sum(s for _, _, s in rows)
    set_ratio = scp_total / ours_total
    print(f"{'the set':>9}  {_mb_s(total, ours_total):8.1f} MB/s ({ours_total:6.2f} s)  "
          f"{_mb_s(total, scp_total):8.1f} MB/s ({scp_total:6.2f} s)  {set_ratio:8.2f}")
    verdict = "no end-to-end gain from scp" if set_ratio >= SAME_WITHIN else "scp is measurably faster"
    print(f"the whole set (what a build uploads): ratio {set_ratio:.2f}, lowest single size {worst:.2f} "
          f"(>= {SAME_WITHIN}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
