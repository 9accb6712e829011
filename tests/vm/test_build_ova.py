"""`invoke build-ova --provider libvirt` end to end on the locally built base box (stack skipped).

Through the real CLI: fetch (only the OVF schemas, from ../shared as a file:// mirror), render,
up, provision (base, firstboot), seal, halt, export, verify (structure and OVF schema, then a boot
of a fresh copy logged in with the password it prints on its serial console), publish. Then
`invoke verify-ova` accepts the published OVA (schema checked, from the same cache) and refuses a
copy with one byte flipped; a rerun resumes from the state file, does no work again and refuses
to overwrite the published OVA without --force. Two TCG boots in all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from appliance import vagrant
from appliance.config import ApplianceConfig, public_dump

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]
OVF_SCHEMAS = ROOT.parent / "shared" / "ovf" / "schemas"  # served to the build as its schema mirror
BUILD_TIMEOUT = 45 * 60


def _invoke(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_build_ova_then_verify_ova(base_box: object, vm_config: Callable[..., ApplianceConfig], tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    if not (OVF_SCHEMAS / "ovf1").is_dir():
        pytest.skip(f"OVF schemas not found at {OVF_SCHEMAS} (the shared reference data sits next to the clone)")
    cfg = vm_config("buildova", f"output.dir={dist}", "output.version=0.0.1-test",
                    f"artifacts.cache_dir={tmp_path / 'cache'}", f"artifacts.ovf_schema_mirror={OVF_SCHEMAS.as_uri()}")
    config_file = tmp_path / "appliance.yaml"
    config_file.write_text(yaml.safe_dump(public_dump(cfg), sort_keys=False))
    ova = dist / "csghub-0.0.1-test.ova"
    try:
        build = _invoke("build-ova", "--config", str(config_file), "--provider", "libvirt", timeout=BUILD_TIMEOUT)
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-6000:]

        assert sorted(p.name for p in dist.iterdir()) == sorted([ova.name, ova.name + ".sha256", "build-report.json"])
        digest = subprocess.run(["sha256sum", "-c", ova.name + ".sha256"], cwd=dist, capture_output=True,
                                text=True, timeout=300)
        assert digest.returncode == 0, digest.stdout + digest.stderr
        report = json.loads((dist / "build-report.json").read_text())
        outcomes = {s["name"].split(":")[0]: s["outcome"] for s in report["stages"]}
        assert outcomes["provision"] == outcomes["seal"] == outcomes["export"] == outcomes["verify"] == "ok"
        assert outcomes["fetch"] == "ok"  # the OVF schemas, fetched and verified into the cache
        assert report["ova"]["verification"]["checks"]["OVF schema"] == "checked"
        assert report["ova"]["verified"] is True and report["ova"]["size_bytes"] == ova.stat().st_size
        assert report["config"]["provision"]["skip"] == ["k3s", "csghub"]
        assert "logged in as csghub with the copy's first-boot password" in build.stderr

        accepted = _invoke("verify-ova", str(ova), "--no-boot", "--config", str(config_file))
        assert accepted.returncode == 0, accepted.stderr[-3000:]
        assert "OVF schema: checked" in accepted.stderr, accepted.stderr[-3000:]

        damaged = tmp_path / "damaged.ova"
        shutil.copyfile(ova, damaged)
        with damaged.open("r+b") as f:
            f.seek(damaged.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        refused = _invoke("verify-ova", str(damaged), "--no-boot", "--config", str(config_file))
        assert refused.returncode != 0
        assert "digest" in refused.stderr.lower(), refused.stderr[-3000:]

        _first_boot_is_proved_once(ova, tmp_path)

        again = _invoke("build-ova", "--config", str(config_file), "--provider", "libvirt", timeout=BUILD_TIMEOUT)
        assert again.returncode == 2, again.stderr[-3000:]
        assert "resuming" in again.stderr and "pass --force" in again.stderr
        assert "already exported from this sealed VM" in again.stderr
        assert "this OVA was verified already" in again.stderr
    finally:
        vagrant.destroy(cfg)


def _first_boot_is_proved_once(ova: Path, tmp_path: Path) -> None:
    """One copy booted twice: the first boot shows the verifier's nonce; the second is refused.

    The second boot is what an image looks like whose first boot already ran (a sealed build VM
    booted again): its login line carries the first boot's nonce, not this boot's.
    """
    import tarfile

    from appliance.errors import VerifyError
    from appliance.run import run
    from appliance.verify_boot import ConsoleLogin, boot_check

    with tarfile.open(ova) as tar:
        disk = next(m for m in tar.getmembers() if m.name.endswith(".vmdk"))
        tar.extract(disk, tmp_path / "disk", filter="data")
    vmdk = tmp_path / "disk" / disk.name
    overlay = tmp_path / "copy.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "vmdk", "-b", str(vmdk), str(overlay)])
    first = boot_check(vmdk, login=ConsoleLogin(), overlay=overlay, timeout=600, memory_mb=1024,
                       work_dir=tmp_path, nonce="1" * 32)
    assert first.first_boot_proved and first.stack == "absent"
    with pytest.raises(VerifyError, match="first boot already ran before this boot") as err:
        boot_check(vmdk, login=ConsoleLogin(), overlay=overlay, timeout=600, memory_mb=1024, work_dir=tmp_path,
                   nonce="2" * 32)
    assert f"first-boot nonce {'1' * 32!r}, not this boot's {'2' * 32!r}" in err.value.reasons[0]
