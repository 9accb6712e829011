"""The appliance configuration: declared once, validated up front, frozen.

Layers, lowest first: the defaults declared on the models below < ``appliance.yaml`` (or
``--config FILE``) < ``--set key.path=value`` (Helm style, values parsed as YAML scalars,
repeatable) < ``--provider X``. Unknown keys are errors. Every problem in every layer is
reported in one ``ConfigError``, each naming its source, key path, value and what is allowed.

A setting is declared exactly once, as a field here. Its description is the reference text
(``docs/configuration.md`` is generated from it). Which settings the provisioning scripts
receive, and under which variable names, is the guest contract's business: ``appliance.guest``.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from appliance import safeyaml
from appliance.chart_credentials import chart_credential_findings
from appliance.errors import ConfigError, ConfigProblem
from appliance.formats import DEFAULT_FORMATS, FORMATS, OutputFormat
from appliance.inputs import describe, read_regular

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = "appliance.yaml"

# CSGHub's published sizing (OpenCSG docs): minimum 4 cores / 8 GiB, recommended 8 / 16.
CSGHUB_MIN_CPUS = 4
CSGHUB_MIN_MEMORY_MB = 8192
# Below this a Debian guest with sshd cannot boot usefully at all. CSGHub's sizing applies unless a
# step that declares `# appliance: stack` is skipped (appliance.scripts.stack_enabled_for).
ABSOLUTE_MIN_MEMORY_MB = 512


def _check_ipv4(value: str) -> str:
    try:
        ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise ValueError(f"must be an IPv4 address like 192.168.56.10 ({exc})") from None
    return value


# Text settings reach the OVF, the Vagrantfile and files on the guest (/etc/default/k3s, the
# console banner): a control character or line break there would split a line or break the XML,
# so it is refused here, before the build starts. Only the OVF annotation may span lines.
_MULTILINE_FIELDS = frozenset({"description"})


def _control_character(text: str, *, multiline: bool) -> str | None:
    for ch in text:
        if multiline and ch in "\n\t":
            continue
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return f"U+{ord(ch):04X}"
    return None


# The base box `invoke base-box` (and the build's base-box stage) builds locally; the default vm.box.
BUILT_BOX = "csghub/debian12"

class _Section(BaseModel):
    # strict: a boolean or a float is never taken for an integer (`cpus: true`, `memory_mb: 4096.0`).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)

    @field_validator("*")
    @classmethod
    def _no_control_characters(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, list):
            texts = [v for v in value if isinstance(v, str)]
        else:
            texts = []
        multiline = cls is OutputSettings and info.field_name in _MULTILINE_FIELDS
        for text in texts:
            bad = _control_character(text, multiline=multiline)
            if bad:
                allowed = ("of the control characters only tabs and line breaks are allowed here" if multiline
                           else "control characters and line breaks are not allowed here (plain one-line text)")
                raise ValueError(f"contains the control character {bad}; {allowed}")
        return value


class ForwardedPort(_Section):
    """One NAT port forward from the host to the guest."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$", description="Identifier of the forward (Vagrant id).")
    guest: int = Field(ge=1, le=65535, description="Port inside the guest.")
    host: int = Field(ge=1, le=65535, description="Port on the host.")
    host_ip: str = Field("127.0.0.1", description="Host address the forward listens on.")
    protocol: Literal["tcp", "udp"] = Field("tcp", description="Transport protocol.")

    @field_validator("host_ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError(f"must be an IP address like 127.0.0.1 ({exc})") from None
        return v


class VMSettings(_Section):
    name: str = Field(
        "csghub-appliance",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="VM name in the hypervisor and in Vagrant.",
    )
    hostname: str = Field(
        "csghub",
        pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        description="Guest hostname.",
    )
    cpus: int = Field(8, ge=1, le=64, description="Virtual CPUs (CSGHub: 4 minimum, 8 recommended).")
    memory_mb: int = Field(
        16384,
        ge=ABSOLUTE_MIN_MEMORY_MB,
        le=1048576,
        description="Memory in MiB (CSGHub: 8192 minimum, 16384 recommended).",
    )
    disk_gb: int = Field(200, ge=8, le=4096, description="Virtual disk size in GB (sparse; CSGHub publishes 200 GB).")
    box: str = Field(
        BUILT_BOX,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$",
        description="Vagrant base box (`invoke base-box` builds `csghub/debian12` locally).",
    )
    box_version: str = Field(
        "", pattern=r"^([0-9][0-9A-Za-z.+-]*|[<>=~ ,0-9A-Za-z.]*)$", description="Box version constraint (empty: any)."
    )
    box_checksum: str = Field(
        "",
        pattern=r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})?$",
        description="`sha256:<hex>` of the box file Vagrant downloads (pin a public box; empty: not checked).",
    )
    boot_timeout: int = Field(900, ge=30, le=7200, description="Seconds Vagrant waits for the guest to boot.")
    verify_timeout: int = Field(
        3600, ge=60, le=21600,
        description="Seconds verify's boot waits for a fresh copy: its first boot installs the whole release.",
    )


class LibvirtSettings(_Section):
    driver: Literal["auto", "kvm", "qemu"] = Field(
        "auto", description="`kvm` (hardware), `qemu` (TCG emulation), or `auto`: KVM if it really runs a guest."
    )
    uri: str = Field("qemu:///system", pattern=r"^qemu\+?[a-z]*://[^\s'\"]*$", description="libvirt connection URI.")
    storage_pool: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description="libvirt storage pool for disks.")
    management_network_name: str = Field(
        "csghub-mgmt", pattern=r"^[A-Za-z0-9_.-]+$", description="Name of the management network Vagrant uses."
    )
    management_network_address: str = Field(
        "192.168.121.0/24", description="CIDR of the management network (must not overlap the cluster's)."
    )
    management_network_mode: Literal["nat", "none"] = Field(
        "nat", description="`nat` gives the guest a default route out; `none` isolates it (tests)."
    )
    cpu_mode: Literal["auto", "host-passthrough", "host-model", "custom"] = Field(
        "auto", description="CPU model: `auto` is host-passthrough with KVM and a generic model with TCG."
    )
    machine_type: str = Field("pc", pattern=r"^[a-z0-9.-]+$", description="QEMU machine type.")

    @field_validator("management_network_address")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError as exc:
            raise ValueError(f"must be a network like 192.168.121.0/24 ({exc})") from None
        return v


class VirtualBoxSettings(_Section):
    nic_type: Literal["82540EM", "82543GC", "82545EM", "virtio"] = Field(
        "82540EM", description="NIC model (Intel PRO/1000 MT Desktop by default: every guest has the driver)."
    )
    graphics_controller: Literal["vmsvga", "vboxsvga", "vboxvga", "none"] = Field(
        "vmsvga", description="Graphics controller (VMSVGA is VirtualBox's choice for Linux guests)."
    )
    nat_localhost_reachable: bool = Field(
        True,
        description="VirtualBox 7: let the guest reach the host's 127.0.0.1 through NAT (`--nat-localhostreachable1`).",
    )
    gui: bool = Field(False, description="Show the VM window while building.")


class HostOnlyAdapter(_Section):
    enabled: bool = Field(False, description="Add a host-only adapter.")
    address: str = Field(
        "192.168.56.10", description="Static guest address (VirtualBox allows 192.168.56.0/21 by default)."
    )

    @field_validator("address")
    @classmethod
    def _ipv4(cls, v: str) -> str:
        return _check_ipv4(v)


class BridgedAdapter(_Section):
    enabled: bool = Field(False, description="Add a bridged adapter.")
    interface: str = Field("", pattern=r"^[^'\"\\]*$", description="Host interface to bridge (empty: Vagrant asks).")
    address: str = Field("dhcp", description="`dhcp` or a static IPv4 address.")

    @field_validator("address")
    @classmethod
    def _addr(cls, v: str) -> str:
        return v if v == "dhcp" else _check_ipv4(v)


def _default_ports() -> list[ForwardedPort]:
    # Host port == NodePort: the chart writes the NodePort into every external URL it renders,
    # so the browser must reach the gateway on the same number.
    return [
        ForwardedPort(name="http", guest=30080, host=30080),
        ForwardedPort(name="git-ssh", guest=30022, host=30022),
    ]


class NetworkSettings(_Section):
    forwarded_ports: list[ForwardedPort] = Field(
        default_factory=_default_ports, description="NAT port forwards (host 127.0.0.1 by default)."
    )
    hostonly: HostOnlyAdapter = Field(default_factory=HostOnlyAdapter, description="Optional host-only adapter.")
    bridged: BridgedAdapter = Field(default_factory=BridgedAdapter, description="Optional bridged adapter.")


class SSHSettings(_Section):
    user: str = Field("vagrant", pattern=r"^[a-z_][a-z0-9_-]{0,31}$", description="Login user in the guest.")
    private_key: str = Field(
        "", description="Private key file (empty: the key Vagrant reports in `vagrant ssh-config`)."
    )
    connect_timeout: int = Field(30, ge=1, le=600, description="Seconds for one SSH connection attempt.")
    connect_retries: int = Field(20, ge=0, le=1000, description="Attempts while the guest boots or reboots.")
    keepalive: int = Field(15, ge=0, le=600, description="Seconds between SSH keepalives (0: off).")


class K3sSettings(_Section):
    version: str = Field(
        "v1.34.3+k3s1",
        pattern=r"^v[0-9]+\.[0-9]+\.[0-9]+\+k3s[0-9]+$",
        description=(
            "k3s release (pinned in the version lock). v1.34.3+k3s1 is what CSGHub 2.4.0's own installer pins, "
            "and Kubernetes 1.34 is within the range Envoy Gateway 1.7 (bundled by the chart) supports."
        ),
    )
    node_ip: str = Field(
        "10.254.254.1",
        description="Address the appliance owns (dummy interface) that k3s binds to, so an IP change cannot break it.",
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Extra `k3s server` arguments."
    )

    @field_validator("node_ip")
    @classmethod
    def _ipv4(cls, v: str) -> str:
        return _check_ipv4(v)


class CSGHubSettings(_Section):
    chart_version: str = Field(
        "2.4.0",
        pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$",
        description="CSGHub Helm chart version (pinned in the version lock).",
    )
    edition: Literal["ce", "ee"] = Field(
        "ce", description="`ce` (Community) or `ee` (Enterprise)."
    )
    domain: str = Field(
        "csghub.localhost",
        max_length=253,
        pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$",
        description=(
            "External domain. The default `csghub.localhost` needs no DNS: browsers resolve `*.localhost` to the "
            "host's loopback, where the NAT forwards listen."
        ),
    )
    image_registry: str = Field(
        "",
        pattern=r"^([a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?)?$",
        description=(
            "Registry CSGHub's images are pulled from at build time (empty: the chart's docker.io). Users in "
            "mainland China: `opencsg-registry.cn-beijing.cr.aliyuncs.com` (OpenCSG's documented mirror)."
        ),
    )
    values: dict[str, Any] = Field(
        default_factory=dict, description="Free-form Helm values, merged last over the generated ones."
    )


class ArtifactsSettings(_Section):
    k3s_mirror: str = Field(
        "https://github.com/k3s-io/k3s/releases/download",
        pattern=r"^(https?|file)://\S+[^/]$",
        description=(
            "Base URL of k3s release folders (`<base>/<version>/k3s`, `sha256sum-amd64.txt` beside it); "
            "point it at a mirror with the same layout."
        ),
    )
    chart_repo: str = Field(
        "https://charts.opencsg.com/csghub",
        pattern=r"^(https?|file)://\S+[^/]$",
        description="Helm chart repository holding `index.yaml` and `csghub-<version>.tgz` (OpenCSG's, or a mirror).",
    )
    helm_mirror: str = Field(
        "https://get.helm.sh",
        pattern=r"^(https?|file)://\S+[^/]$",
        description=(
            "Where the build host's helm comes from (`<base>/helm-<version>-linux-amd64.tar.gz`, `.sha256sum` "
            "beside it); helm renders the chart on the build host to compute the image set."
        ),
    )
    ovf_schema_mirror: str = Field(
        "",
        pattern=r"^$|^(https?|file)://\S+[^/]$",
        description=(
            "Where the DMTF OVF schemas `verify-ova` validates against come from: empty = the pinned upstream "
            "URLs in the version lock; else a base holding `<base>/ovf1/<file>` and `<base>/ovf2/<file>` "
            "(e.g. `file:///srv/ovf-schemas`). Every file is checked against its pinned sha256 either way."
        ),
    )
    cache_dir: str = Field(
        "", description="Download cache (empty: `$XDG_CACHE_HOME/csghub-appliance`, else `~/.cache/csghub-appliance`)."
    )


class ImagesSettings(_Section):
    mirrors: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Registry mirrors for fetching the image set on the build host: registry host -> mirror "
            "(`host[:port][/path]`), e.g. `{docker.io: mirror.corp:5000/dockerhub}`. Only where images are "
            "fetched from changes: inside the appliance they keep the chart's names. Credentials come from "
            "your container auth file (`REGISTRY_AUTH_FILE`, else `$XDG_RUNTIME_DIR/containers/auth.json`, "
            "else `~/.docker/config.json`); proxies from `HTTPS_PROXY`/`NO_PROXY`."
        ),
    )
    ca_dir: str = Field(
        "", description="A folder of extra CA certificates (`*.crt`) trusted for the registries (empty: the system's)."
    )

    @field_validator("mirrors")
    @classmethod
    def _mirror_hosts(cls, value: dict[str, str]) -> dict[str, str]:
        for registry, mirror in value.items():
            if not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]+)?", registry):
                raise ValueError(f"{registry!r} is not a registry host (host or host:port, e.g. docker.io)")
            if not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*", mirror):
                raise ValueError(f"mirror {mirror!r} for {registry} is not `host[:port][/path]` (no scheme)")
        return value


class ProvisionSettings(_Section):
    skip: list[str] = Field(
        default_factory=list, description="Provisioning steps to skip, by name (e.g. `[k3s, csghub]`)."
    )
    step_timeout: int = Field(3600, ge=10, le=86400, description="Seconds one provisioning step may run.")
    timeouts: dict[str, int] = Field(default_factory=dict, description="Per-step timeouts overriding `step_timeout`.")
    reconnect_attempts: int = Field(
        3, ge=0, le=20, description="Times a step is re-run after the connection drops mid-step."
    )


class OutputSettings(_Section):
    dir: str = Field("dist", description="Where finished artifacts are published.")
    build_dir: str = Field("build", description="Work directory: Vagrantfile, state, logs, staging.")
    name: str = Field(
        "csghub",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="Appliance file name stem.",
    )
    version: str = Field(
        "",
        pattern=r"^([0-9A-Za-z][0-9A-Za-z_.+-]{0,62})?$",
        description="Appliance version (empty: the CSGHub chart version).",
    )
    formats: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FORMATS),
        description=(
            "Output formats to write, by name (each one file: see docs/formats.md): "
            + ", ".join(f"`{name}` ({fmt.title})" for name, fmt in FORMATS.items())
            + ". The first OVA in the list is the one `verify` boots."
        ),
    )
    product: str = Field("CSGHub", max_length=200, description="OVF product name.")
    vendor: str = Field("OpenCSG", max_length=200, description="OVF vendor.")
    vendor_url: str = Field("https://opencsg.com", pattern=r"^https?://\S+$", description="OVF vendor URL.")
    product_url: str = Field(
        "https://github.com/OpenCSGs/csghub", pattern=r"^https?://\S+$", description="OVF product URL."
    )
    description: str = Field(
        "CSGHub, an open-source platform for managing LLM assets (models, datasets, code), on k3s.",
        max_length=2000,
        description="OVF annotation shown at import.",
    )
    eula_file: str = Field("", description="Text file shown as the licence at import (empty: none).")
    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"must name at least one output format (allowed: {', '.join(FORMATS)})")
        unknown = [name for name in value if name not in FORMATS]
        if unknown:
            raise ValueError(f"unknown output format {unknown[0]!r} (allowed: {', '.join(FORMATS)})")
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"lists {twice[0]!r} twice; each format is written once")
        if not any(FORMATS[name].kind == "ova" for name in value):
            raise ValueError("must hold an OVA format (the build verifies and boots an OVA): "
                             + ", ".join(n for n, f in FORMATS.items() if f.kind == "ova"))
        return value

    vmdk_writer: Literal["parallel", "qemu-img"] = Field(
        "parallel",
        description=(
            "How the libvirt provider writes the OVA's streamOptimized VMDK: `parallel` (our writer: grains "
            "compressed on every core, streamed into the OVA; falls back to qemu-img, saying why, for disks it "
            "cannot read directly) or `qemu-img` (one core)."
        ),
    )
    vmdk_compression_level: int = Field(
        6, ge=1, le=9,
        description="zlib level of the parallel VMDK writer (1 fastest, 9 smallest; 6 matches qemu-img's size).",
    )
    vmdk_workers: int = Field(
        0, ge=0, le=1024, description="Compression threads of the parallel VMDK writer (0: every available core)."
    )

    @property
    def output_formats(self) -> tuple[OutputFormat, ...]:
        """The records of ``formats``, in the order given."""
        return tuple(FORMATS[name] for name in self.formats)

    @property
    def primary_ova(self) -> OutputFormat:
        """The first OVA format listed: the one the provider exports, `verify` boots and `publish` names."""
        return next(fmt for fmt in self.output_formats if fmt.kind == "ova")


class ApplianceConfig(_Section):
    """The whole, validated configuration. Frozen: build state lives in ``BuildState``."""

    provider: Literal["auto", "virtualbox", "libvirt"] = Field(
        "auto", description="`virtualbox`, `libvirt`, or `auto`: VirtualBox where installed, else libvirt."
    )
    vm: VMSettings = Field(default_factory=VMSettings, description="The virtual machine.")
    libvirt: LibvirtSettings = Field(default_factory=LibvirtSettings, description="libvirt/QEMU provider settings.")
    virtualbox: VirtualBoxSettings = Field(default_factory=VirtualBoxSettings, description="VirtualBox settings.")
    network: NetworkSettings = Field(default_factory=NetworkSettings, description="How the host reaches the guest.")
    ssh: SSHSettings = Field(default_factory=SSHSettings, description="SSH access used by the build.")
    k3s: K3sSettings = Field(default_factory=K3sSettings, description="k3s.")
    csghub: CSGHubSettings = Field(default_factory=CSGHubSettings, description="CSGHub Helm release.")
    artifacts: ArtifactsSettings = Field(
        default_factory=ArtifactsSettings, description="Where pinned artifacts are downloaded from and cached."
    )
    images: ImagesSettings = Field(
        default_factory=ImagesSettings, description="Where the image set is fetched from on the build host."
    )
    provision: ProvisionSettings = Field(default_factory=ProvisionSettings, description="Provisioning steps.")
    output: OutputSettings = Field(default_factory=OutputSettings, description="Artifacts.")

    # -- derived values (never stored) -------------------------------------------------
    @property
    def appliance_version(self) -> str:
        return self.output.version or self.csghub.chart_version

    @property
    def stack_enabled(self) -> bool:
        """CSGHub is part of the build: no step that declares ``# appliance: stack`` is skipped."""
        from appliance.scripts import stack_enabled_for  # the steps' headers say which steps those are

        return stack_enabled_for(self.provision.skip)

    def path(self, relative: str) -> Path:
        """Resolve a configured path against the project directory."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else PROJECT_ROOT / p

    @property
    def build_dir(self) -> Path:
        return self.path(self.output.build_dir)

    @property
    def dist_dir(self) -> Path:
        return self.path(self.output.dir)

    def http_port(self) -> ForwardedPort | None:
        return next((p for p in self.network.forwarded_ports if p.name == "http"), None)


# -- layering -------------------------------------------------------------------------------


class _Sources:
    """Remembers which layer set which key, so a problem names the file or the --set that caused it."""

    def __init__(self) -> None:
        self.file: str | None = None
        self.file_keys: set[str] = set()
        self.set_keys: set[str] = set()
        self.provider_flag = False
        self.skip_flag: set[str] = set()

    def of(self, key: str) -> str:
        def covered(keys: set[str]) -> bool:
            # A key is covered by a layer that set it, a part of it (vm.cpus[0] for vm.cpus), or
            # a level above it (csghub.values for csghub.values.x).
            return any(
                key == k or key.startswith((k + ".", k + "[")) or k.startswith((key + ".", key + "["))
                for k in keys
            )

        if key == "provider" and self.provider_flag:
            return "--provider"
        if covered(self.set_keys):
            return "--set"
        if self.file and covered(self.file_keys):
            return self.file
        return "defaults"


def _flat_keys(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        yield key
        if isinstance(v, Mapping) and key != "csghub.values":
            yield from _flat_keys(v, key)


_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)((?:\[[0-9]+\])*)$")


def parse_set(expr: str) -> tuple[list[str | int], Any]:
    """Parse one ``--set a.b[0].c=value`` into a path and a YAML-scalar value.

    ``{a,b}`` is a list, as in Helm; an empty value is the empty string.
    Raises ``ValueError`` describing what is malformed.
    """
    if "=" not in expr:
        raise ValueError("expected KEY=VALUE (for example vm.cpus=4)")
    key, _, raw = expr.partition("=")
    key = key.strip()
    if not key:
        raise ValueError("the key before '=' is empty")
    path: list[str | int] = []
    for seg in key.split("."):
        m = _SEGMENT.match(seg)
        if not m:
            raise ValueError(f"bad key segment {seg!r} in {key!r} (letters, digits, '_', '-', optional [N])")
        path.append(m.group(1))
        path.extend(int(i) for i in re.findall(r"\[([0-9]+)\]", m.group(2)))
    value: Any
    stripped = raw.strip()
    if stripped.startswith("{") and stripped.endswith("}") and ":" not in stripped:
        inner = stripped[1:-1].strip()
        value = [_scalar(x.strip()) for x in inner.split(",")] if inner else []
    else:
        value = _scalar(raw)
    return path, value


def _scalar(raw: str) -> Any:
    if raw == "":
        return ""
    try:
        value = safeyaml.load(raw)
    except safeyaml.YAMLRefused as exc:
        raise ValueError(f"the value {exc.message}") from None
    except yaml.YAMLError:
        return raw
    if value is None and raw not in ("null", "~"):
        return raw
    # No setting is a float, but versions look like one (1.10): keep such text as it was typed.
    if isinstance(value, float):
        return raw
    return value


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _assign(data: dict[str, Any], path: Sequence[str | int], value: Any) -> None:
    node: Any = data
    for i, seg in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(seg, int):
            if not isinstance(node, list):
                raise ValueError(_not_a(path[:i], node, "list"))
            if seg >= len(node):
                raise ValueError(f"{_dotted(path[: i + 1])}: no list element {seg}")
            if node[seg] is None:
                node[seg] = [] if isinstance(nxt, int) else {}
            node = node[seg]
        else:
            if not isinstance(node, dict):
                raise ValueError(_not_a(path[:i], node, "mapping"))
            child = node.get(seg)
            if child is None:
                # Only a missing key grows a new level; an existing value keeps its kind.
                child = [] if isinstance(nxt, int) else {}
                node[seg] = child
            node = child
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list):
            raise ValueError(_not_a(path[:-1], node, "list"))
        if last > len(node):
            raise ValueError(f"{_dotted(path)}: no list element {last}")
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        if not isinstance(node, dict):
            raise ValueError(_not_a(path[:-1], node, "mapping"))
        node[last] = value


def _not_a(path: Sequence[str | int], node: Any, kind: str) -> str:
    index = "[N]" if kind == "list" else ".KEY"
    return (f"{_dotted(path) or 'the top level'} holds {node!r}, not a {kind}, so {index} cannot be "
            f"applied to it; set {_dotted(path)}=VALUE instead")


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``: mappings merge, everything else (lists too) replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _defaults_as_dict() -> dict[str, Any]:
    return ApplianceConfig().model_dump(mode="python")


def load_config(
    config_file: str | Path | None = None,
    sets: Sequence[str] = (),
    provider: str | None = None,
    *,
    cwd: Path | None = None,
    skip_steps: Sequence[str] = (),
    step_names: Sequence[str] | None = None,
) -> ApplianceConfig:
    """Build the configuration from its layers. Raises ``ConfigError`` listing every problem.

    ``config_file=None`` reads ``appliance.yaml`` from ``cwd`` when it exists. The provider
    stays as configured (possibly ``auto``); see ``providers.registry.resolve_provider``.
    ``skip_steps`` are the steps the command line skips (``--skip``, ``--only``): they join
    ``provision.skip`` before validation, so skipping on the command line and in the config
    mean the same to every rule. ``step_names`` are the steps that exist (default: the scripts
    in ``provision/``); names in ``provision.skip`` and ``provision.timeouts`` must be among them.
    """
    problems: list[ConfigProblem] = []
    sources = _Sources()
    data: dict[str, Any] = {}

    path: Path | None
    if config_file is not None:
        path = Path(config_file)
    else:
        candidate = (cwd or Path.cwd()) / DEFAULT_CONFIG_FILE
        path = candidate if candidate.exists() else None
    if path is not None:
        sources.file = str(path)
        loaded = _read_yaml(path, problems)
        if loaded is not None:
            data = loaded
            sources.file_keys = set(_flat_keys(loaded))

    merged = deep_merge(_defaults_as_dict(), data)
    for expr in sets:
        try:
            key_path, value = parse_set(expr)
            _assign(merged, key_path, value)
        except ValueError as exc:
            problems.append(ConfigProblem("--set", expr, f"malformed override: {exc}"))
            continue
        sources.set_keys.add(_dotted(key_path))
    if provider is not None:
        merged["provider"] = provider
        sources.provider_flag = True
    if skip_steps:
        sources.skip_flag = set(skip_steps)
        prov = merged.get("provision")
        if isinstance(prov, dict) and isinstance(prov.get("skip"), list):
            prov["skip"] = sorted(set(prov["skip"]) | set(skip_steps))
    if step_names is None:
        from appliance.scripts import discover_scripts  # scripts.py imports this module

        step_names = [s.name for s in discover_scripts()]

    cfg: ApplianceConfig | None = None
    try:
        cfg = ApplianceConfig.model_validate(merged)
    except ValidationError as exc:
        problems.extend(_translate(exc, sources))
    problems.extend(_cross_checks(merged, sources))
    problems.extend(_chart_credentials(merged, sources))
    problems.extend(_check_step_names(merged, sources, step_names))
    problems.extend(_check_paths(merged, sources))
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return cfg


def _chart_credentials(data: Mapping[str, Any], sources: _Sources) -> list[ConfigProblem]:
    """Credentials in csghub.values: refused when inside the appliance, warned about when outside."""
    from appliance.log import log

    csghub = data.get("csghub")
    refused, warned = chart_credential_findings(csghub.get("values") if isinstance(csghub, Mapping) else None)
    for key, message in warned:
        log.warning(f"{key}: {message}")
    return [ConfigProblem(sources.of(key), key, message, "***", has_value=True) for key, message in refused]


MAX_EULA_BYTES = 1 << 20  # it goes into the OVF descriptor, which verify-ova caps at 4 MiB


def _eula_problem(path: Path) -> str | None:
    try:
        raw = read_regular(path, MAX_EULA_BYTES)
    except OSError as exc:
        return f"cannot be read: {describe(exc)}"
    if len(raw) > MAX_EULA_BYTES:
        return f"larger than {MAX_EULA_BYTES} bytes; a licence text of at most {MAX_EULA_BYTES} bytes is allowed"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} at byte {exc.start}); give a UTF-8 text file"
    return None


def _read_yaml(path: Path, problems: list[ConfigProblem]) -> dict[str, Any] | None:
    try:
        raw = read_regular(path, safeyaml.MAX_BYTES)  # never the whole of a huge file; never a FIFO or device
        if len(raw) > safeyaml.MAX_BYTES:
            problems.append(ConfigProblem(str(path), "", f"the config file is larger than {safeyaml.MAX_BYTES} bytes; "
                                          f"at most {safeyaml.MAX_BYTES} bytes are allowed"))
            return None
        text = raw.decode("utf-8")
    except OSError as exc:
        problems.append(ConfigProblem(str(path), "", f"cannot read the config file: {describe(exc)}"))
        return None
    except UnicodeDecodeError as exc:
        problems.append(ConfigProblem(str(path), "", f"not UTF-8 text: {exc.reason} at byte {exc.start}"))
        return None
    try:
        loaded = safeyaml.load(text)
    except safeyaml.YAMLRefused as exc:
        problems.append(ConfigProblem(str(path), exc.key, exc.message))
        return None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        problems.append(ConfigProblem(str(path), "", f"YAML syntax error{where}: {problem}"))
        return None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        problems.append(
            ConfigProblem(str(path), "", f"the file must hold a mapping of settings, not a {type(loaded).__name__}")
        )
        return None
    return loaded


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class that owns the location ``loc`` (to list the keys allowed there)."""
    model: Any = ApplianceConfig
    for seg in loc:
        if isinstance(seg, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(seg)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = args[0] if args and isinstance(args[0], type) and issubclass(args[0], BaseModel) else ann
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _translate(exc: ValidationError, sources: _Sources) -> list[ConfigProblem]:
    out: list[ConfigProblem] = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if isinstance(p, (str, int))]
        key = _dotted(loc)
        kind = err["type"]
        if kind == "extra_forbidden" and key == "output.ovf_format":
            out.append(ConfigProblem(sources.of(key), key, "replaced by output.formats: write "
                                     "`formats: [virtualbox-ova]` (OVF 1.0) or `[virtualbox-ova-ovf20]` (OVF 2.0)"))
            continue
        if kind == "extra_forbidden":
            owner = _model_at(loc[:-1])
            allowed = ", ".join(owner.model_fields) if owner is not None else ""
            msg = "unknown key" + (f"; allowed here: {allowed}" if allowed else "")
            out.append(ConfigProblem(sources.of(key), key, msg))
            continue
        msg = err["msg"]
        if kind == "int_type":
            msg = "must be a whole number like 4 (not true/false, not a decimal like 4.0, not text)"
        elif kind == "bool_type":
            msg = "must be true or false"
        elif kind == "string_type":
            msg = "must be text (quote it in YAML if it looks like a number)"
        elif kind == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif kind == "string_pattern_mismatch":
            msg = f"does not match the allowed form {err.get('ctx', {}).get('pattern', '')}"
        out.append(ConfigProblem(sources.of(key), key, msg, err.get("input"), has_value=True))
    return out


def _cross_checks(data: Mapping[str, Any], sources: _Sources) -> list[ConfigProblem]:
    """Rules between settings. Runs on the merged data, tolerating wrong types (reported elsewhere)."""
    problems: list[ConfigProblem] = []
    vm = data.get("vm") if isinstance(data.get("vm"), Mapping) else {}
    prov = data.get("provision") if isinstance(data.get("provision"), Mapping) else {}
    assert isinstance(vm, Mapping) and isinstance(prov, Mapping)
    skip = prov.get("skip") if isinstance(prov.get("skip"), list) else []
    assert isinstance(skip, list)
    from appliance.scripts import stack_enabled_for, stack_steps  # the steps' headers name the stack steps

    stack = stack_enabled_for(s for s in skip if isinstance(s, str))
    names = stack_steps()
    hint = (f"skip the {' and '.join(names)} steps (provision.skip=[{', '.join(names)}] in the config, or "
            f"--skip {','.join(names)}) for a VM without CSGHub")
    mem = vm.get("memory_mb")
    mem_ok = isinstance(mem, int) and not isinstance(mem, bool)
    if stack and mem_ok and ABSOLUTE_MIN_MEMORY_MB <= mem < CSGHUB_MIN_MEMORY_MB:  # type: ignore[operator]
        problems.append(
            ConfigProblem(
                sources.of("vm.memory_mb"), "vm.memory_mb",
                f"below CSGHub's minimum of {CSGHUB_MIN_MEMORY_MB} MiB (16384 recommended); or {hint}",
                mem, has_value=True,
            )
        )
    cpus = vm.get("cpus")
    if stack and isinstance(cpus, int) and not isinstance(cpus, bool) and 1 <= cpus < CSGHUB_MIN_CPUS:
        problems.append(
            ConfigProblem(
                sources.of("vm.cpus"), "vm.cpus",
                f"below CSGHub's minimum of {CSGHUB_MIN_CPUS} CPUs (8 recommended); or {hint}",
                cpus, has_value=True,
            )
        )
    net = data.get("network") if isinstance(data.get("network"), Mapping) else {}
    assert isinstance(net, Mapping)
    ports = net.get("forwarded_ports")
    if isinstance(ports, list):
        seen_host: dict[tuple[Any, Any, Any], int] = {}
        seen_guest: dict[tuple[Any, Any], int] = {}
        seen_name: dict[Any, int] = {}
        for i, p in enumerate(ports):
            if not isinstance(p, Mapping):
                continue
            proto = p.get("protocol", "tcp")
            hkey = (p.get("host_ip", "127.0.0.1"), p.get("host"), proto)
            key = f"network.forwarded_ports[{i}]"
            if hkey[1] is not None and hkey in seen_host:
                problems.append(ConfigProblem(
                    sources.of(key + ".host"), key + ".host",
                    f"port clash: host port {hkey[1]}/{proto} on {hkey[0]} is already forwarded by "
                    f"network.forwarded_ports[{seen_host[hkey]}]; every forward needs its own host port",
                    p.get("host"), has_value=True,
                ))
            seen_host.setdefault(hkey, i)
            gkey = (p.get("guest"), proto)
            if gkey[0] is not None and gkey in seen_guest:
                problems.append(ConfigProblem(
                    sources.of(key + ".guest"), key + ".guest",
                    f"port clash: guest port {gkey[0]}/{proto} is already forwarded by "
                    f"network.forwarded_ports[{seen_guest[gkey]}]",
                    p.get("guest"), has_value=True,
                ))
            seen_guest.setdefault(gkey, i)
            name = p.get("name")
            if name is not None and name in seen_name:
                problems.append(ConfigProblem(
                    sources.of(key + ".name"), key + ".name",
                    f"duplicate forward name (also network.forwarded_ports[{seen_name[name]}])",
                    name, has_value=True,
                ))
            seen_name.setdefault(name, i)
    out = data.get("output") if isinstance(data.get("output"), Mapping) else {}
    assert isinstance(out, Mapping)
    eula = out.get("eula_file")
    if isinstance(eula, str) and eula:
        ep = Path(eula).expanduser()
        ep = ep if ep.is_absolute() else PROJECT_ROOT / ep
        if not ep.exists():
            problems.append(ConfigProblem(
                sources.of("output.eula_file"), "output.eula_file",
                "no such file (give a readable text file, or leave empty for no licence)", eula, has_value=True,
            ))
        elif (why := _eula_problem(ep)) is not None:  # found now, not by the export after the whole build
            problems.append(ConfigProblem(sources.of("output.eula_file"), "output.eula_file", why, eula,
                                          has_value=True))
    ssh = data.get("ssh") if isinstance(data.get("ssh"), Mapping) else {}
    assert isinstance(ssh, Mapping)
    key_file = ssh.get("private_key")
    if isinstance(key_file, str) and key_file and not Path(key_file).expanduser().is_file():
        problems.append(ConfigProblem(
            sources.of("ssh.private_key"), "ssh.private_key",
            "no such file (give a private key file, or leave empty to use Vagrant's)", key_file, has_value=True,
        ))
    timeouts = prov.get("timeouts")
    if isinstance(timeouts, Mapping):
        for name, value in timeouts.items():
            # A value of the wrong type is reported by the model; the range is checked here.
            if isinstance(value, int) and not isinstance(value, bool) and not 10 <= value <= 86400:
                problems.append(ConfigProblem(
                    sources.of(f"provision.timeouts.{name}"), f"provision.timeouts.{name}",
                    "must be a whole number of seconds between 10 and 86400", value, has_value=True,
                ))
    out = data.get("output") if isinstance(data.get("output"), Mapping) else {}
    assert isinstance(out, Mapping)
    formats = out.get("formats")
    if isinstance(formats, list) and (why := provider_formats_problem(data.get("provider"), formats)):
        problems.append(ConfigProblem(sources.of("output.formats"), "output.formats", why, formats, has_value=True))
    return problems


def provider_formats_problem(provider: object, formats: Sequence[object]) -> str | None:
    """Why ``formats`` cannot be built by ``provider`` (None if they can). Checked on the raw config for an
    explicit provider and again by ``providers.registry.resolve_provider`` once ``auto`` is resolved."""
    if provider != "virtualbox":
        return None
    # VirtualBox's exporter writes only its own OVAs, and the provider does not expose the VM's disk
    # for the other OVAs (appliance/export/extra.py): say so before the build, not after hours of it.
    # The disk formats (qcow2, VHDX) are written from the exported OVA's disk: any provider.
    ovas = [FORMATS[f] for f in formats if isinstance(f, str) and f in FORMATS and FORMATS[f].kind == "ova"]
    if len(ovas) > 1 or any(f.ovf is None or f.ovf.vboxmanage_flag is None for f in ovas):
        return ("with provider virtualbox only one OVA, written by VirtualBox's exporter, can be built "
                "(virtualbox-ova or virtualbox-ova-ovf20; the disk formats qcow2 and vhdx may be added); the "
                "other OVAs need provider libvirt")
    return None


def _check_step_names(data: Mapping[str, Any], sources: _Sources, steps: Sequence[str]) -> list[ConfigProblem]:
    """Names in ``provision.skip`` and ``provision.timeouts`` must be steps that exist."""
    prov = data.get("provision")
    if not isinstance(prov, Mapping):
        return []
    allowed = f"steps are: {', '.join(steps)}"
    problems: list[ConfigProblem] = []
    skip = prov.get("skip")
    if isinstance(skip, list):
        for name in skip:
            if isinstance(name, str) and name not in steps:
                source = "--skip" if name in sources.skip_flag else sources.of("provision.skip")
                problems.append(ConfigProblem(source, "provision.skip", f"no such step; {allowed}", name,
                                              has_value=True))
    timeouts = prov.get("timeouts")
    if isinstance(timeouts, Mapping):
        for name in timeouts:
            if name not in steps:
                key = f"provision.timeouts.{name}"
                problems.append(ConfigProblem(sources.of(key), key, f"no such step; {allowed}"))
    return problems


def _check_paths(data: Mapping[str, Any], sources: _Sources) -> list[ConfigProblem]:
    """Folders the build writes into (and may clear parts of) must be folders of their own."""
    problems: list[ConfigProblem] = []
    out = data.get("output") if isinstance(data.get("output"), Mapping) else {}
    art = data.get("artifacts") if isinstance(data.get("artifacts"), Mapping) else {}
    assert isinstance(out, Mapping) and isinstance(art, Mapping)
    forbidden = {Path("/"), PROJECT_ROOT}
    try:
        forbidden.add(Path.home().resolve())
    except (RuntimeError, KeyError):  # no home directory known: nothing more to forbid
        pass
    resolved: dict[str, Path] = {}
    for key, value, may_be_empty in (("output.dir", out.get("dir"), False),
                                     ("output.build_dir", out.get("build_dir"), False),
                                     ("artifacts.cache_dir", art.get("cache_dir"), True)):
        if not isinstance(value, str) or (may_be_empty and value == ""):
            continue
        if not value.strip():
            problems.append(ConfigProblem(sources.of(key), key, "must name a folder (for example "
                                          f"{_PATH_EXAMPLES[key]}); an empty path is not allowed", value,
                                          has_value=True))
            continue
        p = Path(value).expanduser()
        p = (p if p.is_absolute() else PROJECT_ROOT / p).resolve()
        if p in forbidden:
            problems.append(ConfigProblem(
                sources.of(key), key,
                f"resolves to {p}, which the build must not write into; give a folder of its own "
                f"(for example {_PATH_EXAMPLES[key]})", value, has_value=True,
            ))
            continue
        if p.exists() and not p.is_dir():
            problems.append(ConfigProblem(sources.of(key), key, f"{p} exists and is not a folder", value,
                                          has_value=True))
            continue
        resolved[key] = p
    dist, build = resolved.get("output.dir"), resolved.get("output.build_dir")
    if dist is not None and build is not None and (dist == build or build in dist.parents):
        problems.append(ConfigProblem(
            sources.of("output.dir"), "output.dir",
            f"resolves to {dist}, inside the work folder output.build_dir ({build}); published artifacts "
            "need a folder apart from the work folder", out.get("dir"), has_value=True,
        ))
    return problems


_PATH_EXAMPLES = {"output.dir": "dist", "output.build_dir": "build", "artifacts.cache_dir": "~/.cache/csghub"}


# -- derived views -------------------------------------------------------------------------------


def public_dump(cfg: ApplianceConfig) -> dict[str, Any]:
    """The configuration as plain data for reports and ``invoke config`` (holds no secrets by design)."""
    return cfg.model_dump(mode="json")
