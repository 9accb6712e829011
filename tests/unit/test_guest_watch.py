"""A host command that waits for a guest is interrupted when the guest stops; SIGTERM is Ctrl-C.

Real child processes (``sleep``), real signals to this process; QEMU's log lines as QEMU 7.2
prints them (``accel/kvm/kvm-all.c``, ``target/i386/kvm/kvm.c``).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from appliance.errors import GuestStopped
from appliance.run import Terminated, process_alive, run, termination_as_interrupt
from appliance.verify_boot import qemu_failure_lines


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
