"""Facts about this host that decide whether VirtualBox runs VMs here (read-only probes).

Its kernel driver (``vbox_driver_missing``) and whether this Vagrant drives this VirtualBox line
(``vagrant_drives_virtualbox``, a pure function of the two versions). ``invoke doctor`` shows both
(``provider.check_virtualbox``); ``appliance.hashicorp_vagrant`` asks the second before installing.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

from appliance.checks import Check
from appliance.run import run
from appliance.vagrant import MIN_VAGRANT

VBOXDRV = Path("/dev/vboxdrv")
# The first Vagrant release whose VirtualBox provider drives each VirtualBox line (Vagrant's
# CHANGELOG: "provider/virtualbox: Add support for VirtualBox 7.0" in 2.3.2, 7.1 in 2.4.2, 7.2 in
# 2.4.9). Older lines are covered by MIN_VAGRANT. A Vagrant refuses any VirtualBox line it does not
# list ("a version of VirtualBox installed that is not supported by this version of Vagrant").
VAGRANT_FOR_VIRTUALBOX: dict[tuple[int, int], tuple[int, int, int]] = {
    (7, 0): (2, 3, 2),
    (7, 1): (2, 4, 2),
    (7, 2): (2, 4, 9),
}
OLDEST_VIRTUALBOX = (6, 1)
HASHICORP_VAGRANT = "https://developer.hashicorp.com/vagrant/install"


def vbox_driver_missing(device: Path = VBOXDRV) -> str | None:
    """Why VirtualBox cannot run VMs on this host for want of its kernel driver, or None.

    On Linux the driver is the ``vboxdrv`` module, whose character device VirtualBox opens to run
    any VM. ``VBoxManage list hostinfo`` is no test: it exits 0 without the driver. Other systems
    load the driver with VirtualBox itself and show no such device: there VBoxManage answers
    ``list hostinfo`` only when its service starts.
    """
    if sys.platform.startswith("linux"):
        try:
            mode = device.stat().st_mode
        except OSError:
            return f"missing: {device} does not exist (the vboxdrv kernel module is not loaded)"
        if not stat.S_ISCHR(mode):
            return f"missing: {device} is not a character device"
        return None
    res = run(["VBoxManage", "list", "hostinfo"], check=False, timeout=60)
    return None if res.ok else "VBoxManage list hostinfo failed: " + res.stderr.strip()[:200]


def vagrant_drives_virtualbox(vagrant: tuple[int, ...], virtualbox: tuple[int, ...]) -> Check:
    """Can this Vagrant drive this VirtualBox? Pure: versions in, verdict out (tested as data)."""
    name = "Vagrant supports this VirtualBox"
    v_text, vb_text = ".".join(map(str, vagrant)), ".".join(map(str, virtualbox))
    if len(virtualbox) < 2 or len(vagrant) < 2:
        return Check(name, "warn", f"cannot tell (Vagrant {v_text or '?'}, VirtualBox {vb_text or '?'})")
    line = (virtualbox[0], virtualbox[1])
    if line < OLDEST_VIRTUALBOX:
        return Check(name, "fail", f"VirtualBox {vb_text} is older than {'.'.join(map(str, OLDEST_VIRTUALBOX))}",
                     "install VirtualBox 7: https://www.virtualbox.org/wiki/Downloads")
    newest = max(VAGRANT_FOR_VIRTUALBOX)
    if line > newest:
        needed = VAGRANT_FOR_VIRTUALBOX[newest]
        return Check(name, "warn",
                     f"VirtualBox {vb_text} is newer than any line this tool knows a Vagrant for "
                     f"(newest known: {newest[0]}.{newest[1]}, from Vagrant {'.'.join(map(str, needed))})",
                     f"check Vagrant's CHANGELOG for VirtualBox {line[0]}.{line[1]} support, or install "
                     f"VirtualBox {newest[0]}.{newest[1]}")
    needed = VAGRANT_FOR_VIRTUALBOX.get(line, MIN_VAGRANT)
    if tuple(vagrant) >= needed:
        return Check(name, "ok", f"Vagrant {v_text} drives VirtualBox {vb_text}")
    need_text = ".".join(map(str, needed))
    return Check(name, "fail",
                 f"Vagrant {v_text} refuses VirtualBox {vb_text}: VirtualBox {line[0]}.{line[1]} needs Vagrant >= "
                 f"{need_text}",
                 f"install HashiCorp's Vagrant {need_text} or newer ({HASHICORP_VAGRANT}); Debian's vagrant package "
                 "(2.3.x) drives VirtualBox up to 7.0 only")


