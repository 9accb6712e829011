"""verify_ova's boot check, for real: an OVA made from the locally built base box boots under QEMU.

The disk goes through our OVA writer, is extracted by the verifier, and boots through a qcow2
overlay on the SATA (AHCI) controller and the E1000 NIC the OVF describes; SSH answers on a
loopback forward and the base box's build key logs in. One boot (about 35-55 s under TCG), made
under ``libvirt.driver=auto`` with the probe's answer set to KVM: where KVM cannot run the guest
(this host) the copy is booted once more under TCG. Then short boots of a disk that holds no OS:
refused at the deadline; its QEMU killed by PID, or paused through QMP (as ``virsh suspend``
would), is reported within seconds with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.errors import GuestStopped, VerifyError
from appliance.export.ova import write_ova
from appliance.providers.libvirt import hostprobe
from appliance.run import process_alive
from appliance.verify import SSHLogin, boot_check, verify_ova
from appliance.verify_boot import Qmp

pytestmark = pytest.mark.vm


def _base_box() -> tuple[Path, Path]:
    from appliance.basebox import KEY_NAME, cache_dir

    boxes = sorted((cache_dir() / "libvirt").glob("*.box"), key=lambda p: p.stat().st_mtime)
    key = cache_dir() / "keys" / KEY_NAME
    if not boxes or not key.is_file():
        pytest.skip(f"no base box under {cache_dir()} (build it with `invoke base-box`)")
    return boxes[-1], key


def test_ova_from_the_base_box_boots_and_accepts_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box, key = _base_box()
    # The probe's answer, as a host whose 512-byte payload ran under KVM gives it (this one does);
    # kept in this test's folder, not the host's shared cache.
    monkeypatch.setattr(hostprobe, "_probe_cache_dir", lambda: tmp_path)
    (tmp_path / hostprobe.CACHE_NAME).write_text(json.dumps(
        {"boot_id": hostprobe.boot_id(), "driver": "kvm", "reason": "set by the test"}))
    with tarfile.open(box) as tar:
        tar.extract("box.img", tmp_path, filter="data")
    cfg = load_config(None, ["vm.cpus=2", "vm.memory_mb=2048", "provision.skip=[k3s, csghub]"], "libvirt",
                      cwd=tmp_path)
    ova = write_ova(tmp_path / "box.img", cfg, tmp_path / "out" / "basebox.ova").path
    before = ova.read_bytes()
    report = verify_ova(ova, boot=True, login=SSHLogin(cfg.ssh.user, key), boot_timeout=300, work_dir=tmp_path,
                        driver="auto")
    assert report.boot is not None
    assert report.boot.ready_output in ("running", "degraded")
    assert ova.read_bytes() == before  # the OVA was only read
    cached = json.loads((tmp_path / hostprobe.CACHE_NAME).read_text())
    if report.boot.accelerator == "kvm":
        assert not report.boot.kvm_failure and cached["driver"] == "kvm"  # KVM really runs guests on this host
    else:
        # KVM could not run it: one retry under TCG, and the probe now answers TCG for this host boot.
        assert report.boot.accelerator == "tcg" and report.boot.kvm_failure
        assert cached["driver"] == "qemu" and report.boot.kvm_failure in cached["reason"]


def test_a_disk_without_an_os_is_refused_with_the_console_tail(tmp_path: Path, small_disk_no_os: Path) -> None:
    _, key = _base_box()
    with pytest.raises(VerifyError) as err:
        boot_check(small_disk_no_os, login=SSHLogin("vagrant", key), timeout=20, memory_mb=256, work_dir=tmp_path,
                   driver="qemu")
    assert "did not accept SSH within 20 s" in err.value.message
    assert any(r.startswith("console tail:") for r in err.value.reasons)


def _qemu_of_the_boot(work_dir: Path, timeout: float = 30) -> tuple[int, Path]:
    """The PID and QMP socket of the boot check's QEMU, once it started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for found in work_dir.glob("boot-check-*/qemu.json"):
            qemu = json.loads(found.read_text())
            return int(qemu["pid"]), Path(qemu["qmp"])
        time.sleep(0.2)
    raise AssertionError("the boot check's QEMU did not start")


@pytest.mark.parametrize("how", ["killed", "paused"])
def test_a_copy_that_stops_running_fails_within_seconds_with_the_reason(
    how: str, tmp_path: Path, small_disk_no_os: Path
) -> None:
    _, key = _base_box()
    seen: dict[str, object] = {}

    def stop_the_guest() -> None:
        pid, qmp = _qemu_of_the_boot(tmp_path)
        seen["pid"] = pid
        time.sleep(2)
        if how == "killed":
            os.kill(pid, signal.SIGKILL)
            return
        for _ in range(50):  # the boot check's own queries hold the socket for a moment now and then
            try:
                Qmp(qmp).execute("stop")
                return
            except OSError:
                time.sleep(0.1)

    stopper = threading.Thread(target=stop_the_guest)
    stopper.start()
    started = time.monotonic()
    with pytest.raises(GuestStopped) as err:
        boot_check(small_disk_no_os, login=SSHLogin("vagrant", key), timeout=600, memory_mb=256, work_dir=tmp_path,
                   driver="qemu")
    stopper.join()
    assert time.monotonic() - started < 60
    assert err.value.accelerator == "tcg"
    if how == "killed":
        assert f"QEMU (PID {seen['pid']}) exited (killed by SIGKILL)" in err.value.message
    else:
        assert "QEMU reports the guest paused" in err.value.message
        assert not process_alive(int(str(seen["pid"])))  # the paused QEMU was stopped by its PID


@pytest.fixture
def small_disk_no_os(tmp_path: Path) -> Path:
    from appliance.run import run

    vmdk = tmp_path / "empty.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", str(vmdk), "16M"])
    return vmdk
