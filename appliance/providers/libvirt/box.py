"""The vagrant-libvirt base box: packaging the built disk (qcow2), and its kernel for the KVM probe."""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance.basebox import BOX_DISK_GB, KERNEL_DIR_SUFFIX, KEY_NAME, cache_dir, write_box
from appliance.image import PARTITION_OFFSET
from appliance.log import log
from appliance.run import run, which

PROVIDER = "libvirt"

_BOX_VAGRANTFILE = """\
# Embedded in the csghub base box: log in with the key made for this box's build.
Vagrant.configure('2') do |config|
  config.ssh.private_key_path = [File.join(File.dirname(__FILE__), '{key}')]
  config.ssh.insert_key = false
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = 'virtio'
    lv.nic_model_type = 'virtio'
  end
end
"""


def package_libvirt_box(raw_disk: Path, box_file: Path, *, key: Path, info: dict[str, object]) -> None:
    """Package ``raw_disk`` as a vagrant-libvirt box (box.img qcow2 + metadata.json + Vagrantfile).

    Written next to ``box_file`` and renamed into place, so a failed run leaves no half box.
    """
    work = raw_disk.parent
    qcow2 = work / "box.img"
    run(["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(raw_disk), str(qcow2)])
    metadata = {"provider": PROVIDER, "format": "qcow2", "virtual_size": BOX_DISK_GB}
    members: list[tuple[str, bytes | Path, int]] = [
        ("metadata.json", json.dumps(metadata, indent=2).encode() + b"\n", 0o644),
        ("Vagrantfile", _BOX_VAGRANTFILE.format(key=KEY_NAME).encode(), 0o644),
        ("info.json", json.dumps(info, indent=2, sort_keys=True).encode() + b"\n", 0o644),
        (KEY_NAME, key, 0o600),
        ("box.img", qcow2, 0o644),
    ]
    write_box(box_file, members)
    qcow2.unlink()


# -- the box's own kernel, for the KVM probe ------------------------------------------------------

@dataclass(frozen=True)
class BoxKernel:
    """The kernel and initramfs inside a cached libvirt base box (the KVM probe, ``providers.libvirt.hostprobe``)."""

    vmlinuz: Path
    initrd: Path


def box_kernel(root: Path | None = None) -> BoxKernel | None:
    """The kernel and initramfs of the newest cached libvirt box, taken out of its disk once and kept
    beside it (``<box>.kernel/``); None when no box is cached (or the tools to read it are missing)."""
    boxes = sorted(((root or cache_dir()) / PROVIDER).glob("*.box"), key=lambda p: p.stat().st_mtime)
    if not boxes:
        return None
    box = boxes[-1]
    folder = box.with_suffix(KERNEL_DIR_SUFFIX)
    kernel = BoxKernel(folder / "vmlinuz", folder / "initrd.img")
    if kernel.vmlinuz.is_file() and kernel.initrd.is_file():
        return kernel
    if which("debugfs") is None or which("qemu-img") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="box-kernel-", dir=box.parent) as tmp:
        work = Path(tmp)
        with tarfile.open(box) as tar:
            tar.extract("box.img", work, filter="data")
        raw = work / "disk.raw"
        run(["qemu-img", "convert", "-O", "raw", str(work / "box.img"), str(raw)], timeout=600)
        (work / "box.img").unlink()
        # The root filesystem starts 1 MiB into the disk (appliance.image); debugfs reads it there, unmounted.
        device = f"{raw}?offset={PARTITION_OFFSET}"
        listing = run(["debugfs", "-R", "ls -p /boot", device], timeout=120).stdout
        names = [f.split("/")[5] for f in listing.splitlines() if f.count("/") >= 6]
        vmlinuz = sorted(n for n in names if n.startswith("vmlinuz-"))
        initrd = sorted(n for n in names if n.startswith("initrd.img-"))
        if not vmlinuz or not initrd:
            log.debug(f"no kernel in {box}'s /boot: {names}")
            return None
        out = work / "out"
        out.mkdir()
        for name, target in ((vmlinuz[-1], "vmlinuz"), (initrd[-1], "initrd.img")):
            run(["debugfs", "-R", f"dump /boot/{name} {out / target}", device], timeout=120)
        for part in out.iterdir():
            part.chmod(0o644)  # libvirt's QEMU user reads them
        out.chmod(0o755)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, folder)
    return kernel
