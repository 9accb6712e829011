"""VirtualBox's own exports through our verifier, and the VirtualBox provider's export
(``export_virtualbox``) against the real VBoxManage."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.providers.registry import provider_for
from appliance.providers.virtualbox.chroot import VBoxSession
from appliance.providers.virtualbox.export import nat_rules
from appliance.verify import verify_ova

pytestmark = pytest.mark.vbox

SCHEMAS = Path(__file__).resolve().parents[2].parent / "shared" / "ovf" / "schemas"


def schema_dir() -> Path:
    if not (SCHEMAS / "ovf1").is_dir():
        pytest.skip(f"OVF schemas not found at {SCHEMAS}")
    return SCHEMAS


@pytest.mark.parametrize("fmt", ["ovf10", "ovf20"])
def test_verify_accepts_virtualboxs_own_export(fmt: str, vbox: VBoxSession, built_ova: Path, tmp_path: Path,
                                               import_ova: Callable[..., dict[str, str]], vm_name: str) -> None:
    import_ova(built_ova, vm_name)
    out = tmp_path / f"vbox-{fmt}.ova"
    vbox.manage("export", vm_name, "-o", str(out), "--manifest", f"--{fmt}")
    with tarfile.open(out) as tar:
        names = tar.getnames()
        mf = tar.extractfile(names[-1])
        assert mf is not None
        first_line = mf.read().decode().splitlines()[0]
    # What makes VirtualBox's layout different from ours, so the acceptance below means something.
    assert names[-1].endswith(".mf")
    assert first_line.startswith("SHA1 (" if fmt == "ovf10" else "SHA256 (")
    assert out.stat().st_size % 512 == 0 and out.read_bytes()[-1024:] != b"\0" * 1024
    report = verify_ova(out, boot=False, schema_dir=schema_dir())
    assert report.ovf_format == fmt
    assert report.schema_checked  # OVF 2.0: "checked (VirtualBox's known OVF 2.0 deviations repaired: ...)"


def test_export_virtualbox_against_real_vboxmanage(
        vbox: VBoxSession, vboxmanage_on_path: Path, built_ova: Path, tmp_path: Path,
        make_cfg: Callable[..., ApplianceConfig], import_ova: Callable[..., dict[str, str]], vm_name: str) -> None:
    eula = tmp_path / "EULA.txt"
    eula.write_text("Licence.\n")
    cfg = make_cfg(f"vm.name={vm_name}", "output.version=9.8.7", f"output.eula_file={eula}")
    cfg = cfg.model_copy(update={"provider": "virtualbox"})  # make_cfg's configs are libvirt ones
    import_ova(built_ova, vm_name)
    # What Vagrant leaves on a VirtualBox VM: an ssh forward the appliance must not ship.
    vbox.manage("modifyvm", vm_name, "--natpf1", "ssh,tcp,127.0.0.1,2222,,22")

    # Through the provider, as the export stage asks it.
    exported = provider_for(cfg).export(tmp_path / "dist")
    result = exported.ova
    assert exported.disk is None  # VirtualBox keeps its disk to itself: the report names none

    assert result.path == tmp_path / "dist" / f"{cfg.output.name}-9.8.7.ova"
    assert result.sha256_file.read_text().split()[0] == result.sha256
    assert not list((tmp_path / "dist").glob(".*work*"))  # the temporary folder is gone
    report = verify_ova(result.path, boot=False, schema_dir=schema_dir())
    assert report.ovf_format == "ovf10"

    again = import_ova(result.path, f"{vm_name}-again", "--eula", "accept")
    assert {r.name for r in nat_rules(again)} == {p.name for p in cfg.network.forwarded_ports}
    assert again["vrde"] == "off" and again["audio"] == "none"
    assert again["cpus"] == str(cfg.vm.cpus) and again["memory"] == str(cfg.vm.memory_mb)
    assert "9.8.7" in vbox.manage("import", str(result.path), "-n").stdout  # the version reached the OVF
