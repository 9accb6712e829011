"""libvirt's system daemons on the build host, made usable by the tool rather than by hand.

With systemd as PID 1, Debian's ``libvirt-daemon-system`` provides what libvirtd needs (its
units, the ``libvirt-qemu`` user in the ``kvm`` group, ``/var/log/libvirt``); ``scripts/setup.sh``
installs it there. Without systemd (containers, CI) that package cannot start anything, so the
same one-time preparation is done here (``prepare_host``: the log folder and the QEMU user, as
that package's postinst makes them), and ``up`` starts ``virtlogd``/``libvirtd`` itself when it
may (root, no systemd, the daemons installed but not running), saying so and leaving them running
for the next task. The VM tests' fixture uses the same functions.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import PrerequisiteMissing
from appliance.log import log
from appliance.run import run, which

SYSTEM_URI = "qemu:///system"
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")


# -- what `virsh domstate --reason` says ----------------------------------------------------------

# States in which a domain is still on its way up (libvirt 9: tools/virsh-domain-monitor.c).
STARTING = {("paused", "starting up"), ("paused", "booting"), ("paused", "migration"), ("paused", "snapshot")}
# States a domain that ran is in once it no longer runs its guest.
STOPPED = ("paused", "shut off", "crashed", "pmsuspended")


def parse_domstate(text: str) -> tuple[str, str]:
    """``("paused", "crashed")`` from ``virsh domstate --reason`` output ``paused (crashed)``."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    m = re.fullmatch(r"(.+?)\s*\((.*)\)", line)
    return (m.group(1).strip(), m.group(2).strip()) if m else (line, "")


def has_stopped(state: str, reason: str) -> bool:
    """Whether a domain in this state no longer runs its guest (a paused domain still starting up does)."""
    return state in STOPPED and (state, reason) not in STARTING
# Debian builds libvirt with --with-qemu-user=libvirt-qemu: QEMU runs as this user unless qemu.conf says otherwise.
DEFAULT_QEMU_USER = "libvirt-qemu"
KVM_DEVICE = Path("/dev/kvm")
# Where `up` keeps the PIDs of the daemons it started (so they are stopped by PID, never by name).
PID_DIR = Path("/run/csghub-appliance/libvirt")
START_TIMEOUT = 30.0


def systemd_running() -> bool:
    """systemd is PID 1 (sd_booted(3): the folder /run/systemd/system exists)."""
    return Path("/run/systemd/system").is_dir()


def socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def qemu_user(conf: Path = QEMU_CONF) -> str:
    """The user libvirt runs QEMU as: ``user = "..."`` in qemu.conf, else Debian's default."""
    try:
        text = conf.read_text()
    except OSError:
        return DEFAULT_QEMU_USER
    found = re.search(r'^\s*user\s*=\s*"([^"]+)"', text, re.M)
    return found.group(1).lstrip("+") if found else DEFAULT_QEMU_USER


# -- can libvirt's QEMU open /dev/kvm? -------------------------------------------------------------


@dataclass(frozen=True)
class KvmAccess:
    """Whether ``user`` may open the KVM device for reading and writing, and how to change that."""

    user: str
    allowed: bool
    detail: str
    fix: str = ""


def kvm_access(user: str, device: Path = KVM_DEVICE) -> KvmAccess:
    """Decide from the device's owner, group and mode and the user's groups (as the kernel would)."""
    try:
        st = device.stat()
    except OSError:
        return KvmAccess(user, False, f"{device} does not exist (no KVM on this host: TCG emulation is used)")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return KvmAccess(user, False, f"user {user} does not exist",
                         "run `bash scripts/setup.sh` (it prepares libvirt for this host)")
    groups = set(os.getgrouplist(user, entry.pw_gid))
    allowed = may_open_rw(st.st_mode, st.st_uid, st.st_gid, entry.pw_uid, groups)
    group = _group_name(st.st_gid)
    mode = stat.filemode(st.st_mode)
    detail = f"{device} is {mode} {_user_name(st.st_uid)}:{group}; {user} is in {_names(groups)}"
    if allowed:
        return KvmAccess(user, True, detail)
    if st.st_gid != 0 and st.st_mode & 0o060 == 0o060:
        fix = f"usermod -aG {group} {user} (then restart libvirtd)"
    else:
        fix = (f"{device} is for root only here: let the kvm group use it (udev rule KERNEL==\"kvm\", GROUP=\"kvm\", "
               f"MODE=\"0660\", or `chgrp kvm {device} && chmod 0660 {device}`) and `usermod -aG kvm {user}`; "
               "or keep libvirt.driver auto (TCG emulation)")
    return KvmAccess(user, False, detail, fix)


def may_open_rw(mode: int, owner: int, group: int, uid: int, groups: set[int]) -> bool:
    """POSIX permission check for read+write (root may always)."""
    if uid == 0:
        return True
    if uid == owner:
        return mode & 0o600 == 0o600
    if group in groups:
        return mode & 0o060 == 0o060
    return mode & 0o006 == 0o006


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _names(gids: set[int]) -> str:
    return ", ".join(sorted(_group_name(g) for g in gids)) or "no group"


# -- preparing and starting the daemons without systemd -------------------------------------------


def prepare_host() -> list[str]:
    """What libvirt-daemon-system's postinst makes, for a host without it: the log folder, the QEMU user
    (in the ``kvm`` group when there is one). Idempotent; returns what it changed."""
    changes = []
    if not QEMU_LOG_DIR.is_dir():
        QEMU_LOG_DIR.mkdir(parents=True, exist_ok=True)
        changes.append(f"made {QEMU_LOG_DIR}")
    user = DEFAULT_QEMU_USER
    if run(["getent", "passwd", user], check=False).returncode != 0:
        # libvirtd 9 resolves this user at start even when qemu.conf names another one.
        run(["useradd", "--system", "--no-create-home", "--home-dir", "/var/lib/libvirt", "--user-group",
             "--shell", "/usr/sbin/nologin", user])
        changes.append(f"made the system user {user}")
    try:
        kvm = grp.getgrnam("kvm")
    except KeyError:
        kvm = None
    if kvm is not None and user not in kvm.gr_mem:
        run(["usermod", "-aG", "kvm", user])
        changes.append(f"added {user} to the kvm group")
    for change in changes:
        log.info(f"changed: {change}")
    return changes


def start_daemon(program: str, sock: Path, pid_file: Path, timeout: float = START_TIMEOUT) -> int:
    """Start ``program -d --pid-file PID_FILE`` and wait until its socket answers; its PID."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    run([program, "-d", "--pid-file", str(pid_file)], timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_file.exists() and socket_answers(sock):
            return int(pid_file.read_text().strip())
        time.sleep(0.2)
    log_file = Path("/var/log/libvirt") / f"{program}.log"
    tail = log_file.read_text(errors="replace").splitlines()[-5:] if log_file.exists() else []
    raise PrerequisiteMissing(f"{program} did not start within {timeout:.0f} s" + (": " + " | ".join(tail)
                                                                                 if tail else ""),
                              hint=f"run `{program} -v` to see why")


def may_start_daemons(uri: str) -> str:
    """Why ``up`` may not start libvirtd itself here ("" when it may)."""
    if uri != SYSTEM_URI:
        return f"libvirt.uri is {uri}, not the local system instance"
    if systemd_running():
        return "systemd manages libvirtd on this host"
    if os.geteuid() != 0:
        return "starting libvirtd needs root"
    if which("libvirtd") is None or which("virtlogd") is None:
        return "libvirtd is not installed"
    return ""


def start_hint(uri: str = SYSTEM_URI) -> str:
    """A command that starts libvirt on this very host."""
    sudo = "" if os.geteuid() == 0 else "sudo "
    if which("libvirtd") is None:
        return "install it: `bash scripts/setup.sh`"
    if systemd_running():
        if Path("/lib/systemd/system/libvirtd.service").exists() or Path("/usr/lib/systemd/system/"
                                                                          "libvirtd.service").exists():
            return f"start it: `{sudo}systemctl start libvirtd`"
        return (f"install its units: `{sudo}apt-get install --no-install-recommends libvirt-daemon-system` "
                "(or `bash scripts/setup.sh`), which start it")
    if uri != SYSTEM_URI:
        return f"start the libvirt instance {uri} answers for"
    return (f"run `{sudo}invoke up` (as root it starts libvirtd itself), or start it: "
            f"`{sudo}python3 -m appliance.providers.libvirt.libvirtd prepare && {sudo}virtlogd -d && "
            f"{sudo}libvirtd -d`")


def ensure_running(uri: str) -> bool:
    """Before ``up``: start virtlogd and libvirtd when they are installed but not running and this tool may
    (root, no systemd, the system instance); says so. True when it started them."""
    if uri != SYSTEM_URI or socket_answers(LIBVIRT_SOCKET) or may_start_daemons(uri):
        return False
    prepare_host()
    started = []
    if not socket_answers(VIRTLOGD_SOCKET):
        started.append(f"virtlogd (PID {start_daemon('virtlogd', VIRTLOGD_SOCKET, PID_DIR / 'virtlogd.pid')})")
    started.append(f"libvirtd (PID {start_daemon('libvirtd', LIBVIRT_SOCKET, PID_DIR / 'libvirtd.pid')})")
    log.warning(f"libvirt was not running: started {' and '.join(started)} (no systemd here); they keep running "
                f"for the next task (stop them by PID: `kill $(cat {PID_DIR}/libvirtd.pid {PID_DIR}/virtlogd.pid)`)")
    return True


def main(argv: list[str]) -> int:
    """``python3 -m appliance.providers.libvirt.libvirtd prepare``: the one-time preparation, for scripts/setup.sh."""
    if argv != ["prepare"]:
        print("usage: python3 -m appliance.providers.libvirt.libvirtd prepare", file=sys.stderr)
        return 2
    prepare_host()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
