"""The OVA writer, read back with real tools: tar, sha256sum, qemu-img, virsh's test driver.

About the >8 GiB path: no test writes 8 GiB. ``ustar_header`` is checked directly (octal up to
8 GiB - 1, base-256 from 8 GiB on, parsed back by Python's tarfile), and a sparse archive with
a 9 GiB member (header, a hole, the end marker: a few KiB on disk) is listed by GNU tar and
walked by the verifier's tar scanner. The copy loop itself is size-agnostic and runs in every
other test.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.errors import ExportError
from appliance.export import ova as ova_module
from appliance.export.libvirt import export_libvirt, find_domain_disk, parse_domblklist
from appliance.export.ova import USTAR_MAX_SIZE, manifest_text, ustar_header, write_ova
from appliance.run import run
from appliance.verify_ova import scan_tar


def tar_list(path: Path) -> list[str]:
    return run(["tar", "-tf", str(path)]).stdout.split()


def test_members_in_ovf_mf_references_order(built_ova: Path) -> None:
    assert tar_list(built_ova) == ["csghub-test.ovf", "csghub-test.mf", "csghub-test-disk001.vmdk"]


def test_ovf10_manifest_is_sha1_as_sha1sum_computes(built_ova: Path, tmp_path: Path) -> None:
    # OVF 1.x prescribes SHA-1 manifests (DSP0243 1.1.0, 5.1); VirtualBox's own --ovf10 export writes them.
    run(["tar", "-xf", str(built_ova), "-C", str(tmp_path)])
    manifest = (tmp_path / "csghub-test.mf").read_text()
    lines = manifest.splitlines()
    assert manifest.endswith("\n") and len(lines) == 2
    for line, name in zip(lines, ["csghub-test.ovf", "csghub-test-disk001.vmdk"], strict=True):
        digest = run(["sha1sum", str(tmp_path / name)]).stdout.split()[0]
        assert line == f"SHA1({name})= {digest}"


def test_sha256_file_matches_the_ova(built_ova: Path) -> None:
    sha_file = built_ova.with_name(built_ova.name + ".sha256")
    digest, name = sha_file.read_text().split()
    assert name == built_ova.name
    assert digest == hashlib.sha256(built_ova.read_bytes()).hexdigest()
    run(["sha256sum", "-c", sha_file.name], cwd=built_ova.parent)


def test_headers_are_plain_posix_ustar(built_ova: Path) -> None:
    with built_ova.open("rb") as f:
        data = f.read(512)
        assert data[257:265] == b"ustar\x0000"
    with tarfile.open(built_ova) as tar:
        members = tar.getmembers()
        assert [m.type for m in members] == [tarfile.REGTYPE] * 3
        assert all(m.pax_headers == {} for m in members)
        assert all(m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)


def test_vmdk_is_stream_optimized_with_the_disk_size_and_content(
    built_ova: Path, small_disk: Path, tmp_path: Path
) -> None:
    run(["tar", "-xf", str(built_ova), "-C", str(tmp_path)])
    vmdk = tmp_path / "csghub-test-disk001.vmdk"
    info = json.loads(run(["qemu-img", "info", "--output=json", str(vmdk)]).stdout)
    assert info["format"] == "vmdk"
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["virtual-size"] == 64 * 2**20
    # Same guest-visible bytes as the source disk.
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "vmdk", str(small_disk), str(vmdk)])
    ovf = (tmp_path / "csghub-test.ovf").read_text()
    assert f'ovf:capacity="{64 * 2**20}"' in ovf and f'ovf:size="{vmdk.stat().st_size}"' in ovf


def test_raw_disk_and_ovf20(tmp_path: Path, make_cfg: Callable[..., ApplianceConfig]) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(8 * 2**20)
        f.seek(2**20)
        f.write(b"\x42" * 65536)
    result = write_ova(raw, make_cfg("output.formats={virtualbox-ova-ovf20}"), tmp_path / "out" / "raw-disk.ova")
    assert result.ovf_format == "ovf20"
    assert result.disk.capacity == 8 * 2**20
    assert result.size == result.path.stat().st_size
    with tarfile.open(result.path) as tar:
        ovf = tar.extractfile("raw-disk.ovf")
        assert ovf is not None
        ovf_bytes = ovf.read()
        assert b'ovf:version="2.0"' in ovf_bytes
        mf = tar.extractfile("raw-disk.mf")
        assert mf is not None
        # OVF 2.0 prescribes SHA-256 (DSP0243 2.0); VirtualBox's --ovf20 export writes it too.
        assert mf.read().decode().splitlines()[0] == f"SHA256(raw-disk.ovf)= {hashlib.sha256(ovf_bytes).hexdigest()}"


def test_unsupported_disk_is_refused_and_nothing_is_left(
    tmp_path: Path, make_cfg: Callable[..., ApplianceConfig]
) -> None:
    vmdk = tmp_path / "disk.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "16M"])
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="is vmdk; allowed: qcow2, raw"):
        write_ova(vmdk, make_cfg(), out / "x.ova")
    assert not out.exists() or list(out.iterdir()) == []
    with pytest.raises(ExportError, match=r"must end in \.ova"):
        write_ova(vmdk, make_cfg(), out / "x.tar")
    with pytest.raises(ExportError, match="does not exist"):
        write_ova(tmp_path / "missing.qcow2", make_cfg(), out / "x.ova")


def test_failure_while_packing_leaves_no_partial_or_final_file(
    tmp_path: Path, small_disk: Path, make_cfg: Callable[..., ApplianceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ova_module._write_file_member

    def fail_midway(w: ova_module._HashingWriter, name: str, path: Path, size: int, mtime: int) -> None:
        w.write(ustar_header(name, size))
        w.write(b"\0" * 4096)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ova_module, "_write_file_member", fail_midway)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        write_ova(small_disk, make_cfg("output.vmdk_writer=qemu-img"), out / "broken.ova")
    assert sorted(p.name for p in out.iterdir()) == []
    monkeypatch.setattr(ova_module, "_write_file_member", real)
    result = write_ova(small_disk, make_cfg("output.vmdk_writer=qemu-img"), out / "broken.ova")
    assert sorted(p.name for p in out.iterdir()) == ["broken.ova", "broken.ova.sha256"]
    assert result.path.exists()


def test_manifest_line_format() -> None:
    assert manifest_text([("a.ovf", "00ff"), ("b.vmdk", "ab")]) == b"SHA256(a.ovf)= 00ff\nSHA256(b.vmdk)= ab\n"


# -- member sizes at and beyond the ustar limit ---------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, USTAR_MAX_SIZE, USTAR_MAX_SIZE + 1, 9 * 2**30, 200 * 10**9])
def test_header_size_field_round_trips(size: int) -> None:
    header = ustar_header("disk.vmdk", size, mtime=1_700_000_000)
    info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    assert (info.name, info.size, info.mtime, info.type) == ("disk.vmdk", size, 1_700_000_000, tarfile.REGTYPE)
    assert header[257:265] == b"ustar\x0000"
    if size <= USTAR_MAX_SIZE:
        assert header[124:136] == f"{size:011o}".encode() + b"\0"  # plain octal
    else:
        assert header[124] == 0x80  # base-256, the only change for big members


def test_a_sparse_9_gib_member_is_read_by_gnu_tar_and_our_scanner(tmp_path: Path) -> None:
    size = 9 * 2**30
    archive = tmp_path / "big.tar"
    with archive.open("wb") as f:
        f.write(ustar_header("big.vmdk", size))
        f.seek(512 + size)  # a hole instead of 9 GiB of data
        f.write(b"\0" * 1024)
    listing = run(["tar", "-tvf", str(archive)]).stdout
    assert "big.vmdk" in listing and str(size) in listing
    reasons: list[str] = []
    with archive.open("rb") as f:
        members = scan_tar(f, archive.stat().st_size, reasons)
    assert reasons == []
    assert [(m.name, m.size) for m in members] == [("big.vmdk", size)]


def test_bad_member_names_are_refused() -> None:
    for name in ["", "dir/file", "x" * 101, "ünï"]:
        with pytest.raises((ValueError, UnicodeEncodeError)):
            ustar_header(name, 1)


# -- libvirt: finding the disk (virsh against libvirt's built-in test driver, no daemon) ----------


def _test_node(tmp_path: Path, disk: Path, runstate: int) -> str:
    node = tmp_path / "node.xml"
    node.write_text(f"""<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>csghub-test</name>
    <memory>1048576</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type='file' device='disk'><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>
    </devices>
    <test:runstate>{runstate}</test:runstate>
  </domain>
</node>
""")
    return f"test://{node}"


def test_find_domain_disk_through_virsh(tmp_path: Path, small_disk: Path) -> None:
    uri = _test_node(tmp_path, small_disk, runstate=5)
    assert find_domain_disk(uri, "csghub-test") == small_disk


def test_export_libvirt_refuses_a_running_domain_and_exports_a_halted_one(
    tmp_path: Path, small_disk: Path, make_cfg: Callable[..., ApplianceConfig]
) -> None:
    def with_uri(cfg: ApplianceConfig, uri: str) -> ApplianceConfig:
        # The config accepts qemu URIs only; the test driver is swapped in behind validation.
        return cfg.model_copy(update={"libvirt": cfg.libvirt.model_copy(update={"uri": uri})})

    running = with_uri(make_cfg(), _test_node(tmp_path, small_disk, runstate=1))
    with pytest.raises(ExportError, match="'running'; export needs it shut off"):
        export_libvirt(running, small_disk, tmp_path / "dist", domain="csghub-test")
    (tmp_path / "off").mkdir()
    halted = with_uri(make_cfg("output.version=1.2.3"), _test_node(tmp_path / "off", small_disk, runstate=5))
    result = export_libvirt(halted, small_disk, tmp_path / "dist", domain="csghub-test")
    assert result.path == tmp_path / "dist" / "csghub-1.2.3.ova"


def test_parse_domblklist() -> None:
    text = (
        " Type   Device   Target   Source\n"
        "------------------------------------------------\n"
        " file   disk     vda      /var/lib/libvirt/images/my disk.img\n"
        " file   cdrom    sda      -\n"
    )
    rows = parse_domblklist(text)
    assert [(r.device, r.target, r.source) for r in rows] == [
        ("disk", "vda", "/var/lib/libvirt/images/my disk.img"), ("cdrom", "sda", "-")]


def test_member_times_are_build_time_or_source_date_epoch(
        small_disk: Path, make_cfg: Callable[..., ApplianceConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    before = int(time.time())
    with tarfile.open(write_ova(small_disk, make_cfg(), tmp_path / "now.ova").path) as tar:
        times = {m.mtime for m in tar.getmembers()}
    assert len(times) == 1 and before <= times.pop() <= int(time.time())  # not 1970
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    with tarfile.open(write_ova(small_disk, make_cfg(), tmp_path / "sde.ova").path) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1_700_000_000}
