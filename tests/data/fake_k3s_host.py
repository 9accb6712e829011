#!/usr/bin/env python3
"""Stand-ins for `k3s`, `systemctl` and `ip`, for running provision/20-k3s.sh where neither
k3s nor systemd run. Dispatches on the name it is called by; keeps state (enabled and active
units) in $FAKE_HOST_STATE and records every call in $FAKE_HOST_STATE/calls.log.

The k3s stand-in reports $FAKE_K3S_VERSION; `ip` reports the dummy interface's address once
systemd-networkd was (re)started after its .network file existed, as the real one would.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

STATE = Path(os.environ["FAKE_HOST_STATE"])
NETWORK_DIR = Path("/etc/systemd/network")


def has(kind: str, unit: str) -> bool:
    return (STATE / f"{kind}.{unit}").exists()


def mark(kind: str, unit: str) -> None:
    (STATE / f"{kind}.{unit}").touch()


def systemctl(args: list[str]) -> int:
    args = [a for a in args if a not in ("-q", "--quiet", "--no-block")]
    verb, units = args[0], args[1:]
    if verb == "daemon-reload":
        return 0
    unit = units[0].removesuffix(".service")
    if verb == "is-enabled":
        return 0 if has("enabled", unit) else 1
    if verb == "is-active":
        return 0 if has("active", unit) else 3
    if verb == "enable":
        mark("enabled", unit)
    elif verb in ("start", "restart"):
        mark("active", unit)
        if unit == "systemd-networkd":
            # networkd creates the dummy interface from the files present when it starts.
            network = next(NETWORK_DIR.glob("*dummy-csghub.network"), None)
            if network:
                m = re.search(r"^Address=(\S+)/", network.read_text(), re.M)
                if m:
                    (STATE / "dummy_address").write_text(m.group(1))
    else:
        print(f"fake systemctl: unexpected {args}", file=sys.stderr)
        return 2
    return 0


def ip(args: list[str]) -> int:
    text = " ".join(args)
    if text.startswith("-o -4 addr show"):
        address = STATE / "dummy_address"
        if address.exists():
            print(f"9: dummy-csghub    inet {address.read_text()}/24 brd + scope global dummy-csghub")
    elif text == "route show default":
        print("default via 10.0.2.2 dev eth0 proto dhcp metric 1024")
    else:
        print(f"fake ip: unexpected {args}", file=sys.stderr)
        return 2
    return 0


def k3s(args: list[str]) -> int:
    if args == ["--version"]:
        print(f"k3s version {os.environ['FAKE_K3S_VERSION']} (0000000)\ngo version go1.24")
        return 0
    assert args[0] == "kubectl", args
    text = " ".join(args[1:])
    node_ip = os.environ["K3S_NODE_IP"]
    if text == "get --raw /readyz":
        print("ok")
    elif "get node csghub" in text and "Ready" in text:
        print("True", end="")
    elif "get node csghub" in text and "InternalIP" in text:
        print(node_ip, end="")
    elif "-n kube-system get deployment" in text or "rollout status" in text:
        pass
    else:
        print(f"fake k3s: unexpected kubectl {text}", file=sys.stderr)
        return 2
    return 0


def main() -> int:
    name = Path(sys.argv[0]).name
    with open(STATE / "calls.log", "a") as f:
        f.write(f"{name} {' '.join(sys.argv[1:])}\n")
    handler = {"systemctl": systemctl, "ip": ip}.get(name, k3s)
    return handler(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
