#!/usr/bin/env python3
"""Upload throughput: our SFTP uploader against OpenSSH `scp`, in the same run, same server.

Starts a throwaway OpenSSH server on a loopback port (the ssh test tier's fixture code),
writes a file of random bytes, then copies it with ``appliance.upload.upload_file`` and with
``scp`` (OpenSSH 9 scp speaks SFTP to the same sftp-server), both forced to the same cipher,
and prints both throughputs and their ratio. Target: ours >= 0.9 x scp.

Two comparisons are printed:
- our uploader (the target): ``upload_file`` end to end (for a file this size OpenSSH scp
  pinned to the build's known_hosts, hashed while it is read, size check, sha256sum on the
  guest, rename) vs scp followed by the same sha256sum on the guest;
- Paramiko SFTP path, transfer only: the pipelined write ``upload_file`` uses below
  ``OPENSSH_MIN_BYTES`` (or without scp), on an open session, vs scp minus its connection
  setup (measured as `ssh ... true` with the same options right before it).

Usage: python3 benchmarks/sftp_upload.py [--size-mib 1024] [--cipher aes128-gcm@openssh.com] [--runs 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "ssh")]

from sshd_server import make_server  # noqa: E402

from appliance import upload  # noqa: E402
from appliance.run import run  # noqa: E402
from appliance.ssh import RemoteSession  # noqa: E402

TARGET = 0.9


def _random_file(path: Path, size_mib: int) -> None:
    block = os.urandom(1024 * 1024)
    with path.open("wb") as f:
        for i in range(size_mib):
            # Vary each MiB so nothing along the way can deduplicate or compress it.
            f.write(i.to_bytes(8, "little") + block[8:])


def _mb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--cipher", default="aes128-gcm@openssh.com")
    parser.add_argument("--runs", type=int, default=1, help="repetitions; the median is reported")
    parser.add_argument(
        "--request-size", type=int, default=upload.REQUEST_SIZE, help="SFTP write request bytes"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sftp-bench-") as tmp:
        work = Path(tmp)
        server = make_server(work / "sshd")
        try:
            source = work / "payload.bin"
            _random_file(source, args.size_mib)
            size = source.stat().st_size
            dest_dir = work / "dest"
            dest_dir.mkdir()
            session = RemoteSession(
                server.endpoint(), known_hosts=work / "known_hosts", connect_timeout=10, connect_retries=2,
                ciphers=(args.cipher,),
            )
            ours_send: list[float] = []
            ours_full: list[float] = []
            scp_send: list[float] = []
            scp_full: list[float] = []
            with session:
                session.run("true")  # connect before timing
                cipher = session.transport.remote_cipher
                for i in range(args.runs):
                    target = str(dest_dir / f"ours-{i}.bin")
                    sftp = session.sftp()
                    t0 = time.monotonic()
                    upload._send(sftp, source, target, size, args.request_size, False)
                    ours_send.append(time.monotonic() - t0)
                    sftp.remove(target)
                    t0 = time.monotonic()
                    upload.upload_file(session, source, target, progress=False, skip_identical=False,
                                       request_size=args.request_size)
                    ours_full.append(time.monotonic() - t0)
                    sftp.remove(target)

                    scp_target = str(dest_dir / f"scp-{i}.bin")
                    options = [
                        "-i", str(server.ed25519_key),
                        "-o", "StrictHostKeyChecking=no",
                        "-o", f"UserKnownHostsFile={work / 'scp_known_hosts'}",
                        "-o", "Compression=no", "-o", "BatchMode=yes", "-c", args.cipher,
                    ]
                    argv = ["scp", "-q", "-P", str(server.port), *options,
                            str(source), f"{server.user}@127.0.0.1:{scp_target}"]
                    ssh_argv = ["ssh", "-p", str(server.port), *options, f"{server.user}@127.0.0.1", "true"]
                    t0 = time.monotonic()
                    run(ssh_argv)
                    setup = time.monotonic() - t0
                    t0 = time.monotonic()
                    run(argv)
                    scp_wall = time.monotonic() - t0
                    # The SFTP-path row was measured on an open session, so take scp's setup (the
                    # same `ssh ... true`) out of that row. The uploader row compares whole
                    # operations: our upload_file also starts its own scp, connection and all.
                    scp_send.append(max(scp_wall - setup, 1e-6))
                    t0 = time.monotonic()
                    sums = upload.remote_sha256(session, [scp_target])
                    scp_full.append(scp_wall + time.monotonic() - t0)
                    assert sums.get(scp_target), "scp copy missing"
                    Path(scp_target).unlink()
        finally:
            server.stop()

    def report(label: str, ours: list[float], scp: list[float]) -> float:
        o, s = statistics.median(ours), statistics.median(scp)
        ratio = (size / o) / (size / s)
        print(f"{label}:")
        print(f"  ours (appliance.upload): {_mb_s(size, o):8.1f} MB/s  ({o:.2f} s)")
        print(f"  baseline (OpenSSH scp):  {_mb_s(size, s):8.1f} MB/s  ({s:.2f} s)")
        print(f"  ratio ours/scp:          {ratio:8.2f}  (target >= {TARGET})")
        return ratio

    print(f"file: {args.size_mib} MiB random, cipher {cipher} (both), loopback sshd, "
          f"{args.runs} run(s), median")
    ratio = report("our uploader, verified (sha256 on the guest), vs scp + the same check", ours_full, scp_full)
    report("Paramiko SFTP path alone, transfer only (used below 64 MiB)", ours_send, scp_send)
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
