"""libvirt driver detection: the decision table, the per-boot cache, and the real QEMU payload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.providers.libvirt import hostprobe, libvirtd
from appliance.providers.libvirt.hostprobe import (
    ProbeRun,
    decide_driver,
    detect_libvirt_driver,
    resolve_libvirt_driver,
    run_payload,
)
from appliance.run import which


def test_no_dev_kvm_means_qemu() -> None:
    assert decide_driver(None, None) == ("qemu", "/dev/kvm is missing or not accessible")


def test_kvm_that_hangs_falls_back_to_qemu() -> None:
    kvm = ProbeRun("kvm", False, 15.0, "no result within 15 s (the guest hangs)")
    driver, reason = decide_driver(kvm, ProbeRun("tcg", True, 0.2, "ran"))
    assert driver == "qemu"
    assert "hangs" in reason


def test_kvm_much_slower_than_emulation_is_not_hardware() -> None:
    # What this host measures: KVM needs seconds for a boot sector that TCG runs in 0.2 s.
    driver, reason = decide_driver(ProbeRun("kvm", True, 5.1, "ran"), ProbeRun("tcg", True, 0.2, "ran"))
    assert driver == "qemu"
    assert "5.1 s" in reason and "0.2 s with emulation" in reason


def test_fast_kvm_is_used() -> None:
    assert decide_driver(ProbeRun("kvm", True, 0.3, "ran the test guest in 0.3 s"),
                         ProbeRun("tcg", True, 0.4, "ran"))[0] == "kvm"


def test_slow_host_where_kvm_still_beats_emulation_keeps_kvm() -> None:
    assert decide_driver(ProbeRun("kvm", True, 4.0, "ran"), ProbeRun("tcg", True, 9.0, "ran"))[0] == "kvm"


def test_the_answer_is_cached_for_this_boot_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / hostprobe.CACHE_NAME
    cache.write_text(json.dumps({"boot_id": hostprobe.boot_id(), "driver": "kvm", "reason": "measured before"}))
    monkeypatch.setattr(hostprobe, "run_payload", _must_not_run)
    assert detect_libvirt_driver(cache_dir=tmp_path) == ("kvm", "measured before (probed earlier this boot)")

    # An answer from an earlier boot is not trusted: the probe runs again.
    cache.write_text(json.dumps({"boot_id": "another-boot", "driver": "kvm", "reason": "old"}))
    calls: list[str] = []

    def fake_payload(accel: str, **_: object) -> ProbeRun:
        calls.append(accel)
        return ProbeRun(accel, accel == "tcg", 0.2, "ran" if accel == "tcg" else "no result (hangs)")

    monkeypatch.setattr(hostprobe, "run_payload", fake_payload)
    monkeypatch.setattr(hostprobe.os.path, "exists", lambda p: True)
    monkeypatch.setattr(hostprobe.os, "access", lambda p, m: True)
    # libvirt's QEMU user may open /dev/kvm, and no base box is cached: the payload decides.
    monkeypatch.setattr(libvirtd, "kvm_access", lambda user: libvirtd.KvmAccess(user, True, "allowed"))
    monkeypatch.setattr(hostprobe, "_kernel_probe_inputs", lambda uri: None)
    driver, _ = detect_libvirt_driver(cache_dir=tmp_path)
    assert driver == "qemu" and calls == ["kvm", "tcg"]
    assert json.loads(cache.read_text())["boot_id"] == hostprobe.boot_id()


def test_configured_driver_is_used_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostprobe, "detect_libvirt_driver", _must_not_run)
    assert resolve_libvirt_driver("kvm") == "kvm"
    assert resolve_libvirt_driver("qemu") == "qemu"


@pytest.mark.skipif(which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_the_payload_really_runs_under_emulation() -> None:
    probe = run_payload("tcg", timeout=30)
    assert probe.ran, probe.detail
    assert probe.seconds < 30


@pytest.mark.skipif(which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_an_unknown_accelerator_is_reported_not_crashed() -> None:
    probe = run_payload("no-such-accel", timeout=30)
    assert not probe.ran
    assert "could not run the test guest" in probe.detail


def _must_not_run(*_: object, **__: object) -> object:
    raise AssertionError("the probe must not run")
