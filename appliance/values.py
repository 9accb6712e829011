"""The Helm values the appliance installs CSGHub's chart with (``invoke values``).

Everything here follows ``docs/networking.md`` and the chart's own rules (chart 2.4.0):

- The gateway is a NodePort service and every external URL the chart renders carries the
  http NodePort, so the NodePorts must equal both ends of the NAT forwards (host port ==
  guest port == NodePort): ``http://csghub.localhost:30080`` then works in the host's browser.
- Sub-hosts are ``<svc>.<base>`` where ``<base>`` is the domain minus its first label, or the
  whole domain when it has two labels or ``useTop`` is set (:func:`chart_hostnames`).
- Storage: k3s's ``local-path`` class, ReadWriteOnce. On one node RWO is enough for every
  component (RWO means one *node*); the components CSGHub's docs want ReadWriteMany for are
  given ReadWriteOnce explicitly, which is what CSGHub's own installer does without NFS.
- Sizes are planned to fit ``vm.disk_gb`` (:func:`persistence_plan`).
- No credential of a service inside the appliance is ever set here or accepted from the config
  (:func:`chart_credential_findings`): each imported copy makes its own at first boot
  (``provision/files/firstboot/secrets.sh``); a value would ship the same secret in every OVA.
  Credentials for services outside the appliance (external database, SMTP, ...) are the user's
  choice: accepted, with a warning that every copy carries them.

``csghub.values`` from the config is merged last, so anything here can be overridden.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from appliance.chart_credentials import chart_credential_findings
from appliance.config import ApplianceConfig, deep_merge
from appliance.errors import ConfigError, ConfigProblem, UsageError
from appliance.files import write_atomic

STORAGE_CLASS = "local-path"  # k3s's bundled provisioner
NODE_PORT_RANGE = (30000, 32767)  # k3s's default --service-node-port-range
DEFAULT_NODE_PORTS = {"http": 30080, "https": 30443, "gitssh": 30022}
# Forward names in network.forwarded_ports that carry each gateway port.
FORWARD_FOR_PORT = {"http": "http", "https": "https", "gitssh": "git-ssh"}

# Disk planning, in GiB. Reserved: the OS, k3s and the container images (CSGHub's are large).
SYSTEM_RESERVE_GIB = 50
# Volumes whose need does not grow with the hub's content.
FIXED_VOLUMES_GIB = {
    "nats": 2,
    "redis": 2,
    "dataflow": 10,
    "label-studio": 5,
    "agenticflow": 5,
    "csgbot": 5,
    "loki": 10,
    "prometheus": 8,
}
# What is left is shared by the volumes that hold the hub's content.
GROWING_SHARES = {"minio": 0.55, "gitaly": 0.30, "postgresql": 0.15}
MIN_GROWING_GIB = 40


def _problem(key: str, message: str, value: object) -> ConfigError:
    return ConfigError([ConfigProblem("config", key, message, value, has_value=True)])


def node_ports(cfg: ApplianceConfig) -> dict[str, int]:
    """Gateway NodePorts, taken from the NAT forwards so that host port == NodePort."""
    ports = dict(DEFAULT_NODE_PORTS)
    by_name = {f.name: (i, f) for i, f in enumerate(cfg.network.forwarded_ports)}
    if "http" not in by_name:
        raise _problem(
            "network.forwarded_ports", "needs a forward named `http` (the CSGHub gateway port)",
            [f.name for f in cfg.network.forwarded_ports],
        )
    for port, forward_name in FORWARD_FOR_PORT.items():
        if forward_name not in by_name:
            continue
        i, fwd = by_name[forward_name]
        key = f"network.forwarded_ports[{i}]"
        if fwd.host != fwd.guest:
            raise _problem(
                key,
                f"the `{forward_name}` forward must use the same host and guest port: CSGHub writes the "
                f"port into every URL it hands out, so the browser must reach the gateway on the NodePort "
                f"number (host {fwd.host} != guest {fwd.guest})",
                {"host": fwd.host, "guest": fwd.guest},
            )
        if not NODE_PORT_RANGE[0] <= fwd.guest <= NODE_PORT_RANGE[1]:
            raise _problem(
                key + ".guest",
                f"a NodePort must be within {NODE_PORT_RANGE[0]}-{NODE_PORT_RANGE[1]} (k3s's NodePort range)",
                fwd.guest,
            )
        ports[port] = fwd.guest
    return ports


def persistence_plan(cfg: ApplianceConfig) -> dict[str, int]:
    """Volume sizes in GiB that together fit the VM's disk."""
    disk_gib = cfg.vm.disk_gb * 10**9 // 2**30
    growing = disk_gib - SYSTEM_RESERVE_GIB - sum(FIXED_VOLUMES_GIB.values())
    if growing < MIN_GROWING_GIB:
        need_gib = SYSTEM_RESERVE_GIB + sum(FIXED_VOLUMES_GIB.values()) + MIN_GROWING_GIB
        need_gb = -(-need_gib * 2**30 // 10**9)
        raise _problem(
            "vm.disk_gb",
            f"too small for CSGHub's volumes: at least {need_gb} GB is needed (CSGHub publishes 200 GB)",
            cfg.vm.disk_gb,
        )
    plan = dict(FIXED_VOLUMES_GIB)
    for name, share in GROWING_SHARES.items():
        plan[name] = int(growing * share)
    return plan


def _check_domain(domain: str) -> None:
    labels = domain.split(".")
    # "<ip>.nip.io" without a first label of its own: the chart would drop the IP's first octet.
    if len(labels) >= 3 and labels[0].isdigit() and any(d in domain for d in ("nip.io", "sslip.io")):
        raise _problem(
            "csghub.domain",
            "the chart drops the first label of the domain to form casdoor./minio. hosts, which would cut "
            "the IP address apart; put a label in front, e.g. csghub." + domain,
            domain,
        )


def generate_values(cfg: ApplianceConfig) -> dict[str, Any]:
    """The Helm values for ``cfg``: generated, then ``csghub.values`` merged over them."""
    domain = cfg.csghub.domain
    _check_domain(domain)
    sizes = persistence_plan(cfg)
    rwo = ["ReadWriteOnce"]

    def volume(size: int) -> dict[str, Any]:
        return {"storageClass": STORAGE_CLASS, "accessModes": list(rwo), "size": f"{size}Gi"}

    image: dict[str, Any] = {}
    values: dict[str, Any] = {
        "global": {
            "edition": cfg.csghub.edition,
            "gateway": {
                "service": {"type": "NodePort", "nodePorts": node_ports(cfg)},
                "external": {"domain": domain},
            },
            "image": image,
            "persistence": {"storageClass": STORAGE_CLASS, "accessModes": list(rwo), "size": "5Gi"},
        },
        "postgresql": {"persistence": volume(sizes["postgresql"])},
        "redis": {"persistence": volume(sizes["redis"])},
        "minio": {"persistence": volume(sizes["minio"])},
        "gitaly": {"persistence": volume(sizes["gitaly"])},
        "nats": {"persistence": volume(sizes["nats"])},
        "runner": {"runner": {"storageClassName": STORAGE_CLASS}},
        # CSGHub's docs ask ReadWriteMany for Dataflow; on one node ReadWriteOnce serves every pod.
        "dataflow": {
            "dataflow": {"persistence": volume(sizes["dataflow"])},
            "labelStudio": {"persistence": volume(sizes["label-studio"])},
        },
        "agentichub": {
            "agenticflow": {"persistence": volume(sizes["agenticflow"])},
            "csgbot": {"persistence": volume(sizes["csgbot"])},
        },
        "loki": {"singleBinary": {"persistence": {"storageClass": STORAGE_CLASS, "size": f"{sizes['loki']}Gi"}}},
        "prometheus": {
            "server": {"persistentVolume": {"storageClass": STORAGE_CLASS, "size": f"{sizes['prometheus']}Gi"}}
        },
    }
    gitssh = values["global"]["gateway"]["service"]["nodePorts"]["gitssh"]
    if gitssh != DEFAULT_NODE_PORTS["gitssh"]:
        # The chart writes ":30022" into clone URLs unless told the port; it must be a string.
        values["server"] = {"gitlabShell": {"sshPort": str(gitssh)}}
    if cfg.csghub.image_registry:
        image["registry"] = cfg.csghub.image_registry
        # Subcharts (Prometheus, Loki, ...) read this one; CSGHub's installer sets both.
        values["global"]["imageRegistry"] = f"{cfg.csghub.image_registry}/opencsghq"
    else:
        del values["global"]["image"]

    merged = deep_merge(values, copy.deepcopy(cfg.csghub.values))
    refused, _ = chart_credential_findings(cfg.csghub.values)
    if refused:
        raise ConfigError([ConfigProblem("config", key, message, "***", has_value=True) for key, message in refused])
    return merged


def chart_hostnames(values: dict[str, Any]) -> dict[str, str]:
    """The external names chart 2.4.0 derives from ``values`` (its ``domain.base`` rule)."""
    gateway = values["global"]["gateway"]
    external = gateway["external"]
    domain: str = external["domain"]
    labels = domain.split(".")
    base = domain if external.get("useTop") or len(labels) <= 2 else domain.split(".", 1)[1]
    public = external.get("public") or (f"csghub.{domain}" if len(labels) <= 2 else domain)
    http = gateway["service"]["nodePorts"]["http"]
    return {
        "domain": domain,
        "base": base,
        "portal": domain,
        "casdoor": f"casdoor.{base}",
        "minio": f"minio.{base}",
        "public_wildcard": f"*.{public}",
        "url": f"http://{domain}:{http}",
        "login_url": f"http://casdoor.{base}:{http}",
    }


def values_yaml(cfg: ApplianceConfig) -> str:
    header = (
        f"# Helm values for CSGHub chart {cfg.csghub.chart_version}, generated by csghub-appliance.\n"
        "# Install anywhere: helm install csghub csghub/csghub -n csghub --create-namespace -f <this file>\n"
    )
    return header + yaml.safe_dump(generate_values(cfg), sort_keys=False, default_flow_style=False)


def emit_values(cfg: ApplianceConfig, output: str | None = None) -> Path | None:
    """Print the values (YAML) on stdout, or write them to ``output`` atomically."""
    text = values_yaml(cfg)
    if output is None:
        sys.stdout.write(text)
        return None
    path = Path(output)
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise UsageError(f"cannot write the values to {path}: {exc.strerror or exc}") from None
    return path
