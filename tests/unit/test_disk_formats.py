"""qcow2 and VHDX written from the OVA's disk, read back by qemu-img (info, check, compare).

The OVA is the session's ``built_ova`` (our writer, from a 64 MiB qcow2 with data in three
places); each format is written from the VMDK inside it, read in place. Damaged, foreign and
hostile disks are refused with one line each. The boot of each format is in
``tests/vm/test_disk_formats_boot.py``.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, load_config
from appliance.errors import ConfigError, ExportError, HostFileError, UsageError, VerifyError
from appliance.export.disks import (
    convert_argv,
    convert_disk,
    disk_formats,
    disk_member,
    format_for,
    ova_disk_spec,
)
from appliance.export.extra import write_extra_formats
from appliance.formats import FORMATS
from appliance.pipeline import BuildContext, BuildOptions, stage_export, stage_publish, stage_verify
from appliance.run import run
from appliance.state import BuildState, export_digest
from appliance.verify_boot import SSHLogin, boot_check
from appliance.verify_disk import check_disk, verify_disk
from tests.fake_provider import FakeProvider


def _info(path: Path, fmt: str) -> dict[str, object]:
    info: dict[str, object] = json.loads(run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)]).stdout)
    return info


@pytest.fixture(scope="module")
def disks(built_ova: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each format written once from the session's OVA."""
    written = {}
    for fmt in disk_formats().values():
        dest = tmp_path_factory.mktemp(fmt.name) / f"csghub-test{fmt.suffix}"
        result = convert_disk(built_ova, fmt, dest)
        assert result.path == dest and result.size == dest.stat().st_size
        assert result.virtual_size == 64 << 20
        written[fmt.name] = dest
    return written


@pytest.fixture(params=sorted(disk_formats()))
def written(request: pytest.FixtureRequest, disks: dict[str, Path]) -> Path:
    return disks[request.param]


def _fmt(path: Path) -> str:
    return path.suffix.lstrip(".")


def test_the_disk_member_is_found_in_place(built_ova: Path) -> None:
    disk = disk_member(built_ova)
    assert disk.name == "csghub-test-disk001.vmdk"
    with built_ova.open("rb") as f:  # a streamOptimized VMDK starts with its sparse header's magic
        f.seek(disk.offset)
        assert f.read(4) == b"KDMV"
    assert _info_spec(ova_disk_spec(disk))["format"] == "vmdk"


def _info_spec(spec: str) -> dict[str, object]:
    info: dict[str, object] = json.loads(run(["qemu-img", "info", "--output=json", spec]).stdout)
    return info


def test_qemu_img_reads_each_format_whole_and_identical_to_the_ova_disk(written: Path, built_ova: Path) -> None:
    fmt = format_for(_fmt(written))
    checks = dict(check_disk(written, fmt, built_ova))
    assert checks["qemu-img compare"] == f"identical to the disk in {built_ova.name}"
    assert checks["qemu-img check"] == "no errors"
    # And by hand, as a user would: qemu-img check exits 0, compare says identical.
    run(["qemu-img", "check", "-f", _fmt(written), str(written)])
    extracted = written.parent / "disk.vmdk"
    with tarfile.open(built_ova) as tar:
        src = tar.extractfile(disk_member(built_ova).name)
        assert src is not None
        with src, extracted.open("wb") as out:
            shutil.copyfileobj(src, out)
    compared = run(["qemu-img", "compare", "-f", "vmdk", "-F", _fmt(written), str(extracted), str(written)])
    assert "Images are identical." in compared.stdout
    extracted.unlink()


def test_qcow2_is_version_3_and_zlib_compressed(disks: dict[str, Path]) -> None:
    written = disks["qcow2"]
    info = _info(written, "qcow2")
    data = info["format-specific"]["data"]
    assert data["compat"] == "1.1" and data["compression-type"] == "zlib"
    assert "compressed clusters" in run(["qemu-img", "check", "-f", "qcow2", str(written)]).stdout
    assert "backing-filename" not in info


def test_vhdx_is_dynamic_with_1_mib_blocks(disks: dict[str, Path]) -> None:
    written = disks["vhdx"]
    head = written.read_bytes()[:8]
    assert head == b"vhdxfile"  # the VHDX file type identifier (MS-VHDX 2.2.1)
    info = _info(written, "vhdx")
    assert info["cluster-size"] == 1 << 20
    # dynamic: the 64 MiB disk holds 6.5 MiB of data; only written blocks take space
    assert written.stat().st_size < 32 << 20


def test_the_convert_command_per_format() -> None:
    assert convert_argv("in", FORMATS["qcow2"], Path("out")) == [
        "qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", "-c", "-o", "compat=1.1,compression_type=zlib",
        "in", "out"]
    assert convert_argv("in", FORMATS["vhdx"], Path("out")) == [
        "qemu-img", "convert", "-f", "vmdk", "-O", "vhdx", "-o", "subformat=dynamic,block_size=1M", "in", "out"]


def test_an_unknown_format_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(ExportError, match=r"disk format 'vmdk2': allowed are qcow2, vhdx"):
        format_for("vmdk2")


def test_a_failed_convert_leaves_no_file(built_ova: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "x.qcow2"
    broken = tmp_path / "broken.ova"
    data = bytearray(built_ova.read_bytes())
    disk = disk_member(built_ova)
    data[disk.offset:disk.offset + 4] = b"XXXX"  # the VMDK's magic gone: qemu-img cannot read it
    broken.write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017 - CommandFailed from qemu-img; what matters is below
        convert_disk(broken, FORMATS["qcow2"], dest)
    assert list(dest.parent.iterdir()) == []


def test_an_ova_without_one_disk_is_refused(tmp_path: Path) -> None:
    ova = tmp_path / "nodisk.ova"
    (tmp_path / "a.ovf").write_text("<Envelope/>")
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(tmp_path / "a.ovf", arcname="a.ovf")
    with pytest.raises(ExportError, match="holds 0 VMDK disks"):
        disk_member(ova)


# -- hostile or damaged disks: one line each -----------------------------------------------------


def test_a_disk_of_other_content_fails_compare(built_ova: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", ova_disk_spec(disk_member(built_ova)), str(other)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 20M 4k", str(other)])
    with pytest.raises(VerifyError) as err:
        check_disk(other, FORMATS["qcow2"], built_ova)
    assert "qemu-img compare with the disk in csghub-test.ova exited 1" in err.value.reasons[0]


def test_a_qcow2_with_a_backing_file_is_refused(built_ova: Path, tmp_path: Path, disks: dict[str, Path]) -> None:
    written = disks["qcow2"]
    overlay = tmp_path / "overlay.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(written), str(overlay)])
    with pytest.raises(VerifyError) as err:
        check_disk(overlay, FORMATS["qcow2"], built_ova)
    assert any("names a backing file" in r for r in err.value.reasons)


def test_a_qcow2_with_an_external_data_file_is_refused(built_ova: Path, tmp_path: Path) -> None:
    disk = tmp_path / "split.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(disk), "64M"])
    with pytest.raises(VerifyError) as err:
        check_disk(disk, FORMATS["qcow2"], built_ova)
    assert any("its data lives in another file" in r for r in err.value.reasons)


def test_a_raw_file_named_qcow2_is_refused(built_ova: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake.qcow2"
    run(["qemu-img", "convert", "-O", "raw", ova_disk_spec(disk_member(built_ova)), str(fake)])
    with pytest.raises(VerifyError, match="is not a readable qcow2 disk"):
        check_disk(fake, FORMATS["qcow2"], built_ova)


def test_a_damaged_vhdx_is_refused(built_ova: Path, tmp_path: Path, disks: dict[str, Path]) -> None:
    written = disks["vhdx"]
    damaged = tmp_path / "damaged.vhdx"
    data = bytearray(written.read_bytes())
    data[64 * 1024:64 * 1024 + 4] = b"\0\0\0\0"  # the first header's signature ("head") gone
    data[128 * 1024:128 * 1024 + 4] = b"\0\0\0\0"  # and the second's
    damaged.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="is not a readable vhdx disk"):
        check_disk(damaged, FORMATS["vhdx"], built_ova)


def test_a_disk_of_another_size_is_refused(built_ova: Path, tmp_path: Path) -> None:
    bigger = tmp_path / "bigger.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", ova_disk_spec(disk_member(built_ova)), str(bigger)])
    run(["qemu-img", "resize", "-q", "-f", "qcow2", str(bigger), "128M"])
    with pytest.raises(VerifyError) as err:
        check_disk(bigger, FORMATS["qcow2"], built_ova)
    assert err.value.reasons == [f"virtual size {128 << 20} bytes, the OVA's disk has {64 << 20}"]


def test_verify_disk_without_boot_reports_its_checks(written: Path, built_ova: Path) -> None:
    report = verify_disk(written, format_for(_fmt(written)), reference=built_ova, boot=False)
    assert [name for name, _ in report.checks] == ["qemu-img info", "qemu-img check", "qemu-img compare"]
    assert report.as_dict()["boot"] is None


def test_the_boot_check_names_the_allowed_formats_and_hardware(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("x")
    with pytest.raises(UsageError, match="disk format 'raw': allowed are vmdk, qcow2, vhdx"):
        boot_check(tmp_path / "d", login=SSHLogin("u", key), disk_format="raw", driver="qemu")
    with pytest.raises(UsageError, match="hardware 'scsi': allowed are sata, virtio, ide"):
        boot_check(tmp_path / "d", login=SSHLogin("u", key), hardware="scsi", driver="qemu")


# -- the qcow2's libvirt domain ---------------------------------------------------------------------


def test_the_libvirt_domain_passes_libvirts_own_schema_and_reads_back(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    from appliance.export.disks import libvirt_domain_xml

    xml = tmp_path / "csghub-1.2.xml"
    xml.write_text(libvirt_domain_xml("csghub-1.2", "csghub-1.2.qcow2", cpus=6, memory_mb=12288))
    # libvirt's test driver: `define --validate` checks the XML against libvirt's domain RNG schema
    # (what virt-xml-validate checks), then libvirt's parser reads it; dumpxml is libvirt's reading.
    out = run(["virsh", "-c", "test:///default", f"define --validate {xml}; dumpxml csghub-1.2"]).stdout
    dumped = ET.fromstring(out[out.index("<domain"):])
    assert dumped.findtext("name") == "csghub-1.2" and dumped.findtext("vcpu") == "6"
    assert dumped.find("memory").text == str(12288 * 1024)
    disk = dumped.find("devices/disk")
    assert disk is not None
    assert disk.find("source").get("file") == "/var/lib/libvirt/images/csghub-1.2.qcow2"
    assert disk.find("driver").get("type") == "qcow2" and disk.find("target").get("bus") == "virtio"
    assert dumped.find("devices/interface/model").get("type") == "virtio"
    assert dumped.find("os/loader") is None  # BIOS: the disk boots through its MBR


def test_the_libvirt_domain_escapes_what_it_is_given(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    from appliance.export.disks import libvirt_domain_xml

    text = libvirt_domain_xml('a<b>&"c', "d'&<e>.qcow2", cpus=1, memory_mb=512)
    parsed = ET.fromstring(text)
    assert parsed.findtext("name") == 'a<b>&"c'
    assert parsed.find("devices/disk/source").get("file") == "/var/lib/libvirt/images/d'&<e>.qcow2"


# -- in the build: export writes them, verify checks them, publish ships them ------------------------


def _build_cfg(tmp_path: Path, formats: str = "{virtualbox-ova,qcow2,vhdx}") -> ApplianceConfig:
    return load_config(None, ["provider=libvirt", "provision.skip=[k3s, csghub]",
                              f"output.build_dir={tmp_path / 'build'}", f"output.dir={tmp_path / 'dist'}",
                              "output.version=3.1", f"output.formats={formats}", "vm.cpus=4", "vm.memory_mb=8192"],
                             cwd=tmp_path)


def _verified_build(tmp_path: Path, small_disk: Path, formats: str = "{virtualbox-ova,qcow2,vhdx}") -> BuildContext:
    """export and verify (without the boot: the VM tier boots them) run for real with the fake provider."""
    cfg = _build_cfg(tmp_path, formats)
    ctx = BuildContext(cfg=cfg, options=BuildOptions(boot_check=False),
                       state=BuildState(export_digest=export_digest(cfg), sealed=True))
    ctx.provider = FakeProvider(cfg, disk=small_disk)
    stage_export(ctx)
    stage_verify(ctx)
    return ctx


def test_the_build_writes_verifies_and_publishes_each_listed_format(tmp_path: Path, small_disk: Path) -> None:
    ctx = _verified_build(tmp_path, small_disk)
    assert [(e["format"], Path(e["path"]).name, Path(e.get("sidecar", "-")).name)
            for e in ctx.state.staged_formats] == [("qcow2", "csghub-3.1.qcow2", "csghub-3.1.xml"),
                                                   ("vhdx", "csghub-3.1.vhdx", "-")]
    seen = ctx.state.verify_report["formats"]
    assert seen["qcow2"]["checks"]["qemu-img compare"] == "identical to the disk in csghub-3.1.ova"
    assert seen["vhdx"]["checks"]["qemu-img check"] == "no errors" and seen["vhdx"]["boot"] is None
    stage_publish(ctx)
    dist = tmp_path / "dist"
    assert sorted(p.name for p in dist.iterdir()) == [
        "build-report.json", "csghub-3.1.ova", "csghub-3.1.ova.sha256", "csghub-3.1.qcow2",
        "csghub-3.1.qcow2.sha256", "csghub-3.1.vhdx", "csghub-3.1.vhdx.sha256", "csghub-3.1.xml"]
    for name in ("csghub-3.1.ova", "csghub-3.1.qcow2", "csghub-3.1.vhdx"):
        run(["sha256sum", "-c", f"{name}.sha256"], cwd=dist)
    # The published disks are what qemu-img compares equal to the published OVA's disk.
    for name in ("qcow2", "vhdx"):
        assert dict(check_disk(dist / f"csghub-3.1.{name}", FORMATS[name], dist / "csghub-3.1.ova"))
    domain = (dist / "csghub-3.1.xml").read_text()
    assert "<name>csghub-3.1</name>" in domain and "<vcpu>4</vcpu>" in domain and "csghub-3.1.qcow2" in domain
    report = json.loads((dist / "build-report.json").read_text())
    listed = {d["format"]: d for d in report["formats"]}
    assert listed["qcow2"]["file"] == "csghub-3.1.qcow2" and listed["qcow2"]["sidecar"] == "csghub-3.1.xml"
    assert listed["vhdx"]["sha256"] == (dist / "csghub-3.1.vhdx.sha256").read_text().split()[0]
    assert listed["vhdx"]["verification"]["checks"]["qemu-img compare"].startswith("identical")
    assert report["config"]["output"]["formats"] == ["virtualbox-ova", "qcow2", "vhdx"]


def test_a_disk_changed_after_verify_is_not_published(tmp_path: Path, small_disk: Path) -> None:
    ctx = _verified_build(tmp_path, small_disk, "{virtualbox-ova,vhdx}")
    vhdx = Path(ctx.state.staged_formats[0]["path"])
    with vhdx.open("r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    with pytest.raises(HostFileError, match="changed since it was verified"):
        stage_publish(ctx)
    assert not any((tmp_path / "dist").iterdir())


def test_a_sidecar_changed_after_verify_is_not_published(tmp_path: Path, small_disk: Path) -> None:
    ctx = _verified_build(tmp_path, small_disk, "{virtualbox-ova,qcow2}")
    sidecar = Path(ctx.state.staged_formats[0]["sidecar"])
    sidecar.write_text(sidecar.read_text().replace("/var/lib/libvirt/images/", "/etc/"))
    with pytest.raises(HostFileError, match="changed since it was verified"):
        stage_publish(ctx)
    assert not any((tmp_path / "dist").iterdir())


def test_publish_refuses_to_overwrite_a_disk_without_force(tmp_path: Path, small_disk: Path) -> None:
    ctx = _verified_build(tmp_path, small_disk, "{virtualbox-ova,qcow2}")
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "csghub-3.1.xml").write_bytes(b"precious")
    with pytest.raises(UsageError, match=r"csghub-3\.1\.xml exists already; pass --force"):
        stage_publish(ctx)
    assert (tmp_path / "dist" / "csghub-3.1.xml").read_bytes() == b"precious"


def test_the_disk_formats_need_no_provider_disk(tmp_path: Path, built_ova: Path) -> None:
    """VirtualBox's export exposes no disk: the disk formats come from the OVA, so they are written anyway."""
    cfg = _build_cfg(tmp_path, "{virtualbox-ova,qcow2}")
    written = write_extra_formats(cfg, None, tmp_path, "virtualbox", ova=built_ova)
    assert [(w.format, w.path.name, w.sidecar.name if w.sidecar else None) for w in written] == [
        ("qcow2", "csghub-3.1.qcow2", "csghub-3.1.xml")]
    assert dict(check_disk(written[0].path, FORMATS["qcow2"], built_ova))


def test_output_formats_takes_the_disk_formats_but_still_needs_an_ova(tmp_path: Path) -> None:
    assert _build_cfg(tmp_path, "{qcow2,virtualbox-ova}").output.primary_ova.name == "virtualbox-ova"
    with pytest.raises(ConfigError, match="must hold an OVA format"):
        _build_cfg(tmp_path, "{qcow2,vhdx}")


def test_skip_verify_publishes_disks_and_sidecars_unverified_but_never_changed(tmp_path: Path,
                                                                               small_disk: Path) -> None:
    """With `--skip verify` the disk and its sidecar publish against the digests their export recorded."""
    cfg = _build_cfg(tmp_path, "{virtualbox-ova,qcow2}")
    ctx = BuildContext(cfg=cfg, options=BuildOptions(skip=("verify",), boot_check=False),
                       state=BuildState(export_digest=export_digest(cfg), sealed=True))
    ctx.provider = FakeProvider(cfg, disk=small_disk)
    stage_export(ctx)
    sidecar = Path(ctx.state.staged_formats[0]["sidecar"])
    domain = sidecar.read_text()
    sidecar.write_text(domain.replace("/var/lib/libvirt/images/", "/etc/"))
    with pytest.raises(HostFileError, match="changed since it was verified"):
        stage_publish(ctx)
    assert not any((tmp_path / "dist").iterdir())
    sidecar.write_text(domain)
    stage_publish(ctx)
    dist = tmp_path / "dist"
    assert (dist / "csghub-3.1.xml").read_text() == domain
    run(["sha256sum", "-c", "csghub-3.1.qcow2.sha256"], cwd=dist)
    report = json.loads((dist / "build-report.json").read_text())
    assert report["ova"]["verified"] is False
    assert [(f["format"], f["verified"], f["verification"]) for f in report["formats"]] == [("qcow2", False, None)]
