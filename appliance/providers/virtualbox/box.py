"""The VirtualBox base box: box.ovf (our own OVF writer) and a stream-optimized VMDK."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.basebox import BOX_HOSTNAME, KEY_NAME, write_box
from appliance.config import ApplianceConfig
from appliance.digest import sha256_file
from appliance.export.ova import convert_to_stream_vmdk
from appliance.export.ovf import DiskFacts, ovf_descriptor

VBOX_BOX_DISK = "box-disk001.vmdk"

_VIRTUALBOX_BOX_VAGRANTFILE = """\
# Embedded in the csghub base box: log in with the key made for this box's build.
Vagrant.configure('2') do |config|
  config.ssh.private_key_path = [File.join(File.dirname(__FILE__), '{key}')]
  config.ssh.insert_key = false
end
"""


def package_virtualbox_box(raw_disk: Path, box_file: Path, *, key: Path, info: dict[str, object],
                           cfg: ApplianceConfig, disk_bytes: int) -> None:
    """Package ``raw_disk`` as a Vagrant VirtualBox box: box.ovf, its VMDK, metadata.json, Vagrantfile.

    The disk gets the capacity ``disk_bytes`` (the raw file is extended sparsely first); the
    OVF is ours (``appliance.export.ovf``) for a small VM without port forwards: Vagrant sets
    CPUs, memory and forwards itself at ``vagrant up``.
    """
    if disk_bytes < raw_disk.stat().st_size:
        raise ValueError(f"box disk of {disk_bytes} bytes is smaller than the image ({raw_disk.stat().st_size})")
    with raw_disk.open("r+b") as f:
        f.truncate(disk_bytes)  # sparse: no data written
    work = raw_disk.parent
    vmdk = work / VBOX_BOX_DISK
    convert_to_stream_vmdk(raw_disk, "raw", vmdk)
    box_cfg = cfg.model_copy(update={
        "vm": cfg.vm.model_copy(update={"name": f"{BOX_HOSTNAME}-base", "cpus": 2, "memory_mb": 2048}),
        "network": cfg.network.model_copy(update={"forwarded_ports": []}),
        "output": cfg.output.model_copy(update={"description": "Minimal Debian 12 base box (csghub-appliance)",
                                                "eula_file": ""}),
    })
    disk = DiskFacts(href=VBOX_BOX_DISK, file_size=vmdk.stat().st_size, capacity=disk_bytes,
                     sha256=sha256_file(vmdk))
    ovf = ovf_descriptor(box_cfg, disk, ovf_format="ovf10")
    metadata = {"provider": "virtualbox"}
    write_box(box_file, [
        ("metadata.json", json.dumps(metadata, indent=2).encode() + b"\n", 0o644),
        ("Vagrantfile", _VIRTUALBOX_BOX_VAGRANTFILE.format(key=KEY_NAME).encode(), 0o644),
        ("info.json", json.dumps(info, indent=2, sort_keys=True).encode() + b"\n", 0o644),
        (KEY_NAME, key, 0o600),
        ("box.ovf", ovf, 0o644),
        (VBOX_BOX_DISK, vmdk, 0o644),
    ])
    vmdk.unlink()
