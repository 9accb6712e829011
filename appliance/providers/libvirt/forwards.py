"""vagrant-libvirt's port forwards: ``ssh -L`` processes that must end with the VM.

vagrant-libvirt forwards each NAT port with an ``ssh -n -L HOST_IP:HOST_PORT:GUEST_IP:GUEST_PORT
-N`` process and records its PID in ``.vagrant/machines/default/libvirt/pids/ssh_<HOST_PORT>.pid``;
only its own ``vagrant halt``/``destroy`` end them. A sealed VM powers itself off, so nobody
does, and the processes keep holding the host ports (127.0.0.1:30080, :30022). :func:`clear`
ends exactly the processes tied to this VM: recorded in this VM's project, still an ``ssh``
whose ``-L`` spec forwards that very host port, and one of this configuration's forwards. A
PID that was reused by anything else is left alone.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.log import log
from appliance.run import process_alive, stop_processes

TERM_WAIT = 5.0  # seconds between TERM and KILL


def pid_dir(project: Path, machine: str = "default") -> Path:
    return project / ".vagrant" / "machines" / machine / "libvirt" / "pids"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def forward_of(argv: list[str]) -> tuple[str, int] | None:
    """``(host_ip, host_port)`` of an ``ssh ... -L HOST_IP:HOST_PORT:GUEST:PORT`` command line, else None."""
    if "sudo" in argv[:1]:
        argv = argv[1:]
    if not argv or os.path.basename(argv[0]) != "ssh":
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == "-L":
            parts = value.split(":")  # HOST_IP:HOST_PORT:GUEST_IP:GUEST_PORT (IPv4, as vagrant-libvirt writes)
            if len(parts) == 4 and parts[1].isdigit():
                return parts[0], int(parts[1])
    return None




def clear(cfg: ApplianceConfig, project: Path) -> list[int]:
    """End this VM's leftover port-forward processes; return the PIDs that were ended."""
    folder = pid_dir(project)
    if not folder.is_dir():
        return []
    ours = {(p.host_ip, p.host) for p in cfg.network.forwarded_ports}
    ended: list[int] = []
    for record in sorted(folder.glob("ssh_*.pid")):
        port_text = record.stem.removeprefix("ssh_")
        try:
            pid = int(record.read_text().strip())
        except (OSError, ValueError):
            continue
        forward = forward_of(_cmdline(pid))
        tied = forward is not None and port_text.isdigit() and forward[1] == int(port_text) and forward in ours
        if tied and process_alive(pid):
            _end(pid)
            ended.append(pid)
        if tied or not process_alive(pid):
            record.unlink(missing_ok=True)  # nothing of ours runs under it any more
    if ended:
        log.info(f"ended {len(ended)} port-forward process(es) of {cfg.vm.name} left by vagrant-libvirt")
    return ended


def _end(pid: int) -> None:
    try:
        stop_processes([pid], TERM_WAIT)
    except PermissionError:  # started through sudo (host ports up to 1024)
        log.warning(f"port-forward process {pid} belongs to another user; end it with `sudo kill {pid}`")
