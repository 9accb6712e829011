#!/usr/bin/env python3
"""VirtualBox's OVA import, repeated: how often it fails on our OVA against VirtualBox's own export.

Runs the real VirtualBox 7.2 in the cached chroot (``appliance.providers.virtualbox.chroot``), imports each OVA
``--runs`` times (import, then unregister and delete), and prints the failures of each and
their difference. The baseline is ``tests/data/vbox/vbox-ovf10.ova``, which VirtualBox itself
exported. Our OVA is written by ``appliance.export.ova.write_ova`` from an awkward 100 MiB disk
(holes, allocated zeros, random and text data, a partial last grain).

With ``--load N`` it starts N busy-loop processes for the duration (stopped by PID): VirtualBox
7.2.22's import crashed (a general protection fault in its ``vfsreadahead`` thread, VBoxSVC gone,
``NS_ERROR_ABORT``) on a loaded host when our VMDK's header and descriptor did not fill a whole
grain. Target: our failures equal the baseline's (0).

Usage: python3 benchmarks/vbox_import.py [--runs 40] [--load 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from appliance.config import load_config  # noqa: E402
from appliance.export.ova import write_ova  # noqa: E402
from appliance.providers.virtualbox.chroot import VBoxSession, ensure_chroot  # noqa: E402
from appliance.run import stop_processes  # noqa: E402
from tests.disks import write_awkward_disk  # noqa: E402

BASELINE = ROOT / "tests" / "data" / "vbox" / "vbox-ovf10.ova"


def awkward_ova(work: Path) -> Path:
    raw = write_awkward_disk(work / "awkward.raw")
    cfg = load_config(None, ["vm.cpus=2", "vm.memory_mb=2048", "provision.skip=[k3s, csghub]"], "libvirt", cwd=work)
    return write_ova(raw, cfg, work / "awkward.ova").path


def failures(session: VBoxSession, ova: Path, runs: int) -> int:
    failed = 0
    for _ in range(runs):
        name = f"bench-{uuid.uuid4().hex[:8]}"
        done = session.manage("import", str(ova), "--vsys", "0", "--vmname", name, "--eula", "accept",
                              check=False, timeout=300)
        failed += "Successfully imported" not in done.stdout
        session.manage("unregistervm", name, "--delete", check=False)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes running meanwhile")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vbox-import-bench-") as tmp:
        work = Path(tmp)
        ours = awkward_ova(work)
        session = VBoxSession(ensure_chroot(), work / "session", [ROOT, work])
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
        try:
            session.start()
            base = failures(session, BASELINE, args.runs)
            mine = failures(session, ours, args.runs)
        finally:
            stop_processes([p.pid for p in burners], 5)
            session.stop()
    print(f"imports per OVA: {args.runs}, busy loops: {args.load}")
    print(f"VirtualBox's own export ({BASELINE.name}): {base} failed")
    print(f"our OVA (write_ova, awkward 100 MiB disk):  {mine} failed")
    print(f"difference (ours - baseline): {mine - base}")
    return 0 if mine <= base else 1


if __name__ == "__main__":
    sys.exit(main())
