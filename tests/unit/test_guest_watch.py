"""A host command that waits for a guest is interrupted when the guest stops; SIGTERM is Ctrl-C.

Real child processes (``sleep``), real signals to this process; QEMU's log lines as QEMU 7.2
prints them (``accel/kvm/kvm-all.c``, ``target/i386/kvm/kvm.c``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from appliance.errors import GuestStopped
from appliance.providers.libvirt.hostprobe import qemu_failure_lines
from appliance.providers.libvirt.libvirtd import parse_domstate
from appliance.providers.libvirt.provider import domain_log_reason, qemu_start_failure
from appliance.run import Terminated, process_alive, run, termination_as_interrupt


def test_the_watchdog_interrupts_the_command_and_raises_its_error() -> None:
    started = time.monotonic()
    polls: list[float] = []
    pids: list[int] = []

    def watchdog() -> GuestStopped | None:
        polls.append(time.monotonic())
        if len(polls) < 2:
            return None
        return GuestStopped("the guest stopped", reason="paused", accelerator="kvm")

    with pytest.raises(GuestStopped, match="the guest stopped"):
        run(["sh", "-c", 'echo $$ > /dev/stderr; exec sleep 60'], timeout=120, watchdog=watchdog, watch_every=0.3,
            on_line=lambda _s, line: pids.append(int(line)) if line.isdigit() else None)
    assert time.monotonic() - started < 10
    assert pids and not process_alive(pids[0])


def test_without_a_stop_the_command_ends_normally_and_a_timeout_still_counts() -> None:
    assert run(["sh", "-c", "sleep 0.5; echo done"], watchdog=lambda: None, watch_every=0.1).stdout == "done\n"
    late = run(["sleep", "30"], check=False, timeout=0.5, watchdog=lambda: None, watch_every=0.1)
    assert late.timed_out and late.duration < 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_are_handled_as_ctrl_c(sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt) as err, termination_as_interrupt():
        os.kill(os.getpid(), sig)
        time.sleep(5)
    assert isinstance(err.value, Terminated) and sig.name in str(err.value)
    assert signal.getsignal(sig) is before  # restored on the way out


def test_a_child_is_interrupted_when_the_task_gets_sigterm() -> None:
    pids: list[int] = []
    with pytest.raises(KeyboardInterrupt), termination_as_interrupt():
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        old = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        try:
            run(["sh", "-c", "echo $$ >&2; exec sleep 60"], timeout=120,
                on_line=lambda _s, line: pids.append(int(line)) if line.isdigit() else None)
        finally:
            signal.signal(signal.SIGALRM, old)
    assert pids and not process_alive(pids[0])


def test_qemu_failure_lines_name_the_kvm_error_first() -> None:
    log = (
        "KVM internal error. Suberror: 1\n"
        "extra data[0]: 0x0000000000000000\n"
        "RAX=0000000000000000 RBX=0000000000000000\n"
        "qemu-system-x86_64: terminating on signal 15 from pid 1234 (/usr/sbin/libvirtd)\n"
    )
    assert qemu_failure_lines(log) == ["KVM internal error. Suberror: 1"]
    start_error = ("qemu-system-x86_64: -accel kvm: Could not access KVM kernel module: Permission denied\n"
                   "qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied\n")
    assert qemu_failure_lines(start_error) == start_error.splitlines()
    assert qemu_failure_lines("SeaBIOS (version 1.16.2)\nBooting from Hard Disk...\n") == []


def test_domstate_and_the_domain_log_give_the_state_and_the_reason(tmp_path: Path) -> None:
    assert parse_domstate("paused (crashed)\n\n") == ("paused", "crashed")
    assert parse_domstate("shut off (destroyed)\n") == ("shut off", "destroyed")
    assert parse_domstate("running\n") == ("running", "")
    # libvirt's log of a domain (libvirt 9.0: a "starting up" line at each start, then QEMU's stderr).
    (tmp_path / "vm_default.log").write_text(
        "2026-12-06 01:00:00.000+0000: starting up libvirt version: 9.0.0, qemu version: 7.2.22\n"
        "qemu-system-x86_64: terminating on signal 15 from pid 99 (/usr/sbin/libvirtd)\n"
        "2026-12-06 01:10:00.000+0000: starting up libvirt version: 9.0.0, qemu version: 7.2.22\n"
        "LC_ALL=C PATH=/usr/bin HOME=/var/lib/libvirt/qemu/domain-2-vm_default /usr/bin/qemu-system-x86_64 -name x\n"
        "KVM internal error. Suberror: 1\n"
        "emulation failure\n"
        "EAX=00000000 EBX=00000000\n"
    )
    assert domain_log_reason("vm_default", tmp_path) == "KVM internal error. Suberror: 1"
    assert domain_log_reason("other", tmp_path) == f"no log at {tmp_path / 'other.log'}"


def test_qemu_lines_are_found_inside_vagrant_libvirts_ruby_error() -> None:
    message = (
        "`vagrant up` failed (exit status 1 while starting domain)\n"
        "  last lines of its stderr:\n"
        "    /usr/lib/ruby/vendor_ruby/fog/libvirt/requests/compute/vm_action.rb:7:in `create': Call to "
        "virDomainCreateWithFlags failed: internal error: qemu unexpectedly closed the monitor: "
        "2026-12-06T01:29:53.455913Z qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69 (Libvirt::Error)\n"
        "    qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == "
        "cpu->kvm_msr_buf->nmsrs' failed.\n"
    )
    assert qemu_start_failure(message).startswith("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69; ")
    assert qemu_start_failure("`vagrant up` failed (exit status 1 while waiting for IP)\n  Name resolution") == ""
