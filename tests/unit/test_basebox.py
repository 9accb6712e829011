"""Base box: the MBR we write, the sparse copy, the cache key, the box layout, the version scheme."""

from __future__ import annotations

import json
import os
import struct
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance import basebox, image
from appliance.basebox import box_version, inputs_digest, make_spec
from appliance.config import ApplianceConfig
from appliance.image import PARTITION_OFFSET, _copy_sparse, master_boot_record
from appliance.providers.libvirt.box import package_libvirt_box
from appliance.run import run, which

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnlyxxxxxxxxxxxxxxxxxxxxxxxx test"


def _spec_args(**over: str) -> dict[str, str]:
    args = {
        "user": "vagrant",
        "authorized_key": KEY,
        "suite": "bookworm",
        "mirror": "http://deb.debian.org/debian",
        "security_mirror": "http://deb.debian.org/debian-security",
    }
    args.update(over)
    return args


def test_mbr_has_one_active_linux_partition_and_the_boot_signature() -> None:
    code = bytes(range(256)) + bytes(184)
    mbr = master_boot_record(code, 2048, 8_386_560)
    assert len(mbr) == 512
    assert mbr[:440] == code
    assert mbr[510:] == b"\x55\xaa"
    status, ptype, start, sectors = mbr[446], mbr[450], *struct.unpack("<II", mbr[454:462])
    assert (status, ptype, start, sectors) == (0x80, 0x83, 2048, 8_386_560)
    assert mbr[462:510] == bytes(48)  # the other three entries are empty


def test_mbr_refuses_what_it_cannot_describe() -> None:
    with pytest.raises(ValueError, match="440 bytes"):
        master_boot_record(bytes(441), 2048, 10)
    with pytest.raises(ValueError, match="2 TiB"):
        master_boot_record(b"", 2048, 0xFFFFFFFF)


@pytest.mark.skipif(which("qemu-img") is None, reason="qemu-img is not installed")
def test_qemu_reads_the_partition_we_describe(tmp_path: Path) -> None:
    fs = tmp_path / "fs.img"
    fs.write_bytes(b"FSDATA" + bytes(1024 * 1024 - 6))
    disk = tmp_path / "disk.raw"
    image.assemble_disk(fs, disk, disk_bytes=4 * 1024 * 1024)
    raw = disk.read_bytes()
    assert raw[PARTITION_OFFSET:PARTITION_OFFSET + 6] == b"FSDATA"
    assert raw[446] == 0x80 and raw[510:512] == b"\x55\xaa"
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", str(disk)]).stdout)
    assert info["virtual-size"] == 4 * 1024 * 1024


def test_a_filesystem_larger_than_the_disk_is_refused(tmp_path: Path) -> None:
    fs = tmp_path / "fs.img"
    with fs.open("wb") as f:
        f.truncate(4 * 1024 * 1024)
    with pytest.raises(ValueError, match="does not fit"):
        image.assemble_disk(fs, tmp_path / "disk.raw", disk_bytes=4 * 1024 * 1024)


def test_sparse_copy_keeps_data_at_the_offset_and_holes_as_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with src.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(32 * 1024 * 1024)
        f.write(b"middle")
        f.seek(64 * 1024 * 1024 - 3)
        f.write(b"end")
    dst = tmp_path / "dst"
    with dst.open("wb") as f:
        f.truncate(65 * 1024 * 1024)
    _copy_sparse(src, dst, 1024 * 1024)
    with dst.open("rb") as f:
        f.seek(1024 * 1024 + 32 * 1024 * 1024)
        assert f.read(6) == b"middle"
        f.seek(65 * 1024 * 1024 - 3)
        assert f.read(3) == b"end"
    assert dst.stat().st_blocks * 512 < 4 * 1024 * 1024  # a few data blocks, not 64 MiB


def test_cache_key_is_stable_and_changes_with_each_input() -> None:
    spec, digest = make_spec(**_spec_args())
    assert make_spec(**_spec_args())[1] == digest
    assert spec.root_uuid == make_spec(**_spec_args())[0].root_uuid  # derived, so stable
    for change in ({"suite": "trixie"}, {"mirror": "http://mirror.example/debian"},
                   {"authorized_key": KEY.replace("test", "other")}, {"user": "builder"}):
        assert make_spec(**_spec_args(**change))[1] != digest, change


def test_cache_key_covers_the_package_list_and_the_hook_files(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    spec, digest = make_spec(**_spec_args())
    identity = spec.identity()
    identity["packages"] = [*identity["packages"], "vim"]  # type: ignore[misc]
    assert inputs_digest(identity) != inputs_digest(spec.identity())

    changed = tmp_path / "basebox-customize.sh"
    changed.write_text(image.CUSTOMIZE_SCRIPT.read_text() + "\n# changed\n")
    monkeypatch.setattr(basebox, "CUSTOMIZE_FILES", (changed, *image.CUSTOMIZE_FILES[1:]))
    assert make_spec(**_spec_args())[1] != digest


def test_box_versions_grow_with_build_time() -> None:
    early = box_version(datetime(2026, 11, 28, 0, 5, 9, tzinfo=UTC))
    late = box_version(datetime(2026, 11, 28, 13, 53, 7, tzinfo=UTC))
    assert early == "12.20261128.509"
    assert late == "12.20261128.135307"
    assert tuple(map(int, early.split("."))) < tuple(map(int, late.split(".")))


@pytest.mark.skipif(which("qemu-img") is None, reason="qemu-img is not installed")
def test_the_box_has_the_vagrant_libvirt_layout(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(16 * 1024 * 1024)
        f.write(b"boot")
    key = tmp_path / "vagrant_ed25519"
    key.write_text("PRIVATE KEY\n")
    box = tmp_path / "out.box"
    package_libvirt_box(raw, box, key=key, info={"inputs_sha256": "abc", "version": "12.1.2"})
    assert [p.name for p in tmp_path.iterdir() if "out.box" in p.name] == ["out.box"]
    assert box.stat().st_mode & 0o777 == 0o600, "the box holds the build's private key"
    with tarfile.open(box) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"metadata.json", "Vagrantfile", "info.json", "vagrant_ed25519", "box.img"}
        metadata = json.loads(tar.extractfile("metadata.json").read())  # type: ignore[union-attr]
        assert metadata == {"provider": "libvirt", "format": "qcow2", "virtual_size": basebox.BOX_DISK_GB}
        assert members["vagrant_ed25519"].mode == 0o600
        vagrantfile = tar.extractfile("Vagrantfile").read().decode()  # type: ignore[union-attr]
        assert "File.join(File.dirname(__FILE__), 'vagrant_ed25519')" in vagrantfile
        assert "insecure" not in vagrantfile
        tar.extract("box.img", tmp_path / "x", filter="data")
    info = json.loads(run(["qemu-img", "info", "--output=json", str(tmp_path / "x" / "box.img")]).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 16 * 1024 * 1024


@pytest.mark.skipif(os.geteuid() != 0 or which("mount") is None, reason="needs root to bind-mount")
def test_removing_a_work_tree_never_deletes_through_a_leftover_mount(tmp_path: Path) -> None:
    # An interrupted mmdebstrap can leave the host's /dev bind-mounted in its tree.
    outside = tmp_path / "host-dev"
    outside.mkdir()
    (outside / "sentinel").write_text("keep me")
    tree = tmp_path / "work" / "tree"
    (tree / "dev").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc" / "hostname").write_text("x")
    run(["mount", "--bind", str(outside), str(tree / "dev")])
    try:
        image.remove_tree(tmp_path / "work")
    finally:
        run(["umount", str(tree / "dev")], check=False)
    assert (outside / "sentinel").read_text() == "keep me"
    assert not (tmp_path / "work").exists()


def test_box_digest_per_provider(tmp_path: Path) -> None:
    from appliance.config import load_config
    from appliance.providers.registry import provider_for as box_provider

    def cfg(provider: str, *sets: str) -> ApplianceConfig:
        return load_config(None, ["vm.cpus=2", "vm.memory_mb=2048", "provision.skip=[k3s, csghub]", *sets],
                           provider, cwd=tmp_path)

    image_digest = "ab" * 32
    libvirt = cfg("libvirt")
    assert box_provider(libvirt).name == "libvirt"
    assert box_provider(libvirt).box_digest(image_digest) == image_digest  # cached libvirt boxes stay valid
    small, big = box_provider(cfg("virtualbox", "vm.disk_gb=50")), box_provider(cfg("virtualbox", "vm.disk_gb=200"))
    assert big.name == "virtualbox"
    # The VirtualBox box's disk carries vm.disk_gb, so each size is its own cached box.
    digests = {image_digest, small.box_digest(image_digest), big.box_digest(image_digest)}
    assert len(digests) == 3


def test_the_build_key_and_its_folder_are_private(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    key = basebox._ensure_key(keys)
    assert key.stat().st_mode & 0o777 == 0o600 and keys.stat().st_mode & 0o777 == 0o700
    key.chmod(0o644)  # as an older cache left it
    keys.chmod(0o755)
    assert basebox._ensure_key(keys) == key
    assert key.stat().st_mode & 0o777 == 0o600 and keys.stat().st_mode & 0o777 == 0o700
