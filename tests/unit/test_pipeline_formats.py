"""output.formats through the build: the export writes every listed format, verify checks each, publish
publishes each beside its .sha256 (all or none), and the report lists them. The stages run for real
with the fake provider (its export is our real writer, from a real small disk)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, load_config
from appliance.errors import ApplianceError, ExportError
from appliance.export.extra import write_extra_formats
from appliance.pipeline import BuildContext, BuildOptions, stage_export, stage_publish, stage_verify
from appliance.state import BuildState, export_digest
from tests.fake_provider import FakeProvider


def _cfg(tmp_path: Path, *sets: str) -> ApplianceConfig:
    return load_config(None, ["provider=libvirt", "vm.cpus=2", "vm.memory_mb=2048", "provision.skip=[k3s, csghub]",
                              f"output.build_dir={tmp_path / 'build'}", f"output.dir={tmp_path / 'dist'}",
                              "output.version=9.9.9", *sets], cwd=tmp_path)


def _exported(tmp_path: Path, small_disk: Path) -> BuildContext:
    cfg = _cfg(tmp_path, "output.formats={virtualbox-ova,vmware-ova}")
    ctx = BuildContext(cfg=cfg, options=BuildOptions(boot_check=False),
                       state=BuildState(export_digest=export_digest(cfg), sealed=True))
    ctx.provider = FakeProvider(cfg, disk=small_disk)
    stage_export(ctx)
    return ctx


def test_every_listed_format_is_exported_verified_and_published(tmp_path: Path, small_disk: Path) -> None:
    ctx = _exported(tmp_path, small_disk)
    staged = {e["format"]: Path(e["path"]) for e in ctx.state.staged_formats}
    assert list(staged) == ["vmware-ova"] and staged["vmware-ova"].name == "csghub-9.9.9-vmware.ova"
    assert Path(ctx.state.staged_ova).name == "csghub-9.9.9.ova"
    stage_verify(ctx)
    assert ctx.state.verify_report["formats"]["vmware-ova"]["checks"]["manifest digests"] == "checked"
    stage_publish(ctx)

    dist = tmp_path / "dist"
    assert sorted(p.name for p in dist.iterdir()) == [
        "build-report.json", "csghub-9.9.9-vmware.ova", "csghub-9.9.9-vmware.ova.sha256",
        "csghub-9.9.9.ova", "csghub-9.9.9.ova.sha256"]
    vmware = dist / "csghub-9.9.9-vmware.ova"
    digest = hashlib.sha256(vmware.read_bytes()).hexdigest()
    assert (dist / "csghub-9.9.9-vmware.ova.sha256").read_text() == f"{digest}  csghub-9.9.9-vmware.ova\n"
    report = json.loads((dist / "build-report.json").read_text())
    assert report["formats"] == [{"format": "vmware-ova", "file": vmware.name, "sha256": digest,
                                  "size_bytes": vmware.stat().st_size, "verified": True}]


def test_an_extra_format_altered_after_verify_publishes_nothing(tmp_path: Path, small_disk: Path) -> None:
    ctx = _exported(tmp_path, small_disk)
    stage_verify(ctx)
    vmware = Path(ctx.state.staged_formats[0]["path"])
    data = bytearray(vmware.read_bytes())
    data[len(data) // 2] ^= 0xFF
    vmware.write_bytes(bytes(data))
    with pytest.raises(ApplianceError):
        stage_publish(ctx)
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_an_extra_format_never_verified_is_not_published(tmp_path: Path, small_disk: Path) -> None:
    ctx = _exported(tmp_path, small_disk)
    stage_verify(ctx)
    del ctx.state.verify_report["formats"]  # (the receipt no longer holds either)
    with pytest.raises(ApplianceError, match="not passed verification"):
        stage_publish(ctx)


def test_a_provider_without_its_disk_cannot_write_extra_formats(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "output.formats={virtualbox-ova,vmware-ova}")
    with pytest.raises(ExportError, match="lists vmware-ova, written from the VM's disk, which the virtualbox"):
        write_extra_formats(cfg, None, tmp_path, "virtualbox")
    assert write_extra_formats(_cfg(tmp_path), None, tmp_path, "virtualbox") == []


def test_skip_verify_publishes_every_format_unverified_but_never_a_changed_one(tmp_path: Path,
                                                                               small_disk: Path) -> None:
    """`--skip verify` publishes the OVA with "verified": false; the extra formats go with it, each copied only
    while it hashes to the digest its export recorded (and an extra OVA rechecked), each marked unverified."""
    ctx = _exported(tmp_path, small_disk)
    ctx.options = BuildOptions(skip=("verify",), boot_check=False)
    vmware = Path(ctx.state.staged_formats[0]["path"])
    original = vmware.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    vmware.write_bytes(bytes(data))
    with pytest.raises(ApplianceError):
        stage_publish(ctx)
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())

    vmware.write_bytes(original)
    stage_publish(ctx)
    dist = tmp_path / "dist"
    digest = hashlib.sha256(original).hexdigest()
    assert (dist / vmware.name).read_bytes() == original
    assert (dist / f"{vmware.name}.sha256").read_text() == f"{digest}  {vmware.name}\n"
    report = json.loads((dist / "build-report.json").read_text())
    assert report["ova"]["verified"] is False
    assert [(f["format"], f["sha256"], f["verified"]) for f in report["formats"]] == [("vmware-ova", digest, False)]
