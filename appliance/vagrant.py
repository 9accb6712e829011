"""Up stage: drive the rendered Vagrantfile with Vagrant (python-vagrant), on libvirt or VirtualBox.

The build's Vagrant project is ``cfg.build_dir / "vm"`` (``project_dir``), for every task:
``render`` writes the Vagrantfile there (the one render: libvirt driver ``auto`` resolved
with ``appliance.hostprobe``, pinned uploads included), ``up`` boots the VM from it.
python-vagrant builds the Vagrant command lines; every one of them runs through
``appliance.run.run`` (streamed, captured, logged under ``--debug``) via ``_RoutedVagrant``.

States are read from ``vagrant status --machine-readable`` and SSH details from
``vagrant ssh-config``, parsed here so that repeated keys (several ``IdentityFile`` lines)
all survive: python-vagrant's own parser keeps only the last one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vagrant as python_vagrant

from appliance.config import ApplianceConfig
from appliance.errors import CommandFailed, PrerequisiteMissing, VagrantError
from appliance.log import log
from appliance.run import CommandResult, run, which
from appliance.ssh import SSHEndpoint, forget_host_key, known_hosts_path

VAGRANT_ENV = {
    # Nothing beyond the Debian archive is reachable from build hosts like ours: no phoning home.
    "VAGRANT_CHECKPOINT_DISABLE": "1",
    "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
    "VAGRANT_NO_COLOR": "1",
}
MACHINE = "default"
# States in which `vagrant up` (re)starts the machine.
STARTABLE_STATES = {"not_created", "poweroff", "shutoff", "running"}
# Time beyond vm.boot_timeout that `up` may take: uploading the box image, creating the domain.
UP_MARGIN_SECONDS = 600
STDERR_TAIL = 15


# -- parsing (pure functions, unit-tested on captured output) ---------------------------------------


@dataclass(frozen=True)
class MachineReadableLine:
    """One ``timestamp,target,type,data...`` line of Vagrant's ``--machine-readable`` output."""

    timestamp: str
    target: str
    kind: str
    data: tuple[str, ...]


def _unescape(value: str) -> str:
    return value.replace("%!(VAGRANT_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r")


def parse_machine_readable(text: str) -> list[MachineReadableLine]:
    """Parse ``--machine-readable`` output; lines that are not in that format are skipped."""
    lines: list[MachineReadableLine] = []
    for raw in text.splitlines():
        parts = raw.split(",")
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        lines.append(MachineReadableLine(parts[0], parts[1], parts[2], tuple(_unescape(p) for p in parts[3:])))
    return lines


@dataclass(frozen=True)
class MachineState:
    """A machine as ``vagrant status`` reports it. ``state`` is the provider's own word."""

    name: str
    state: str
    provider: str

    @property
    def exists(self) -> bool:
        return self.state != "not_created"

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def stopped(self) -> bool:
        return self.state in ("poweroff", "shutoff")


def parse_status(text: str) -> list[MachineState]:
    """Machines from ``vagrant status --machine-readable``; an ``error-exit`` line raises ``VagrantError``."""
    states: dict[str, dict[str, str]] = {}
    for line in parse_machine_readable(text):
        if line.kind == "error-exit":
            raise VagrantError(f"vagrant status failed: {' '.join(line.data[1:]) or line.data[0]}")
        if line.target and line.kind in ("provider-name", "state"):
            states.setdefault(line.target, {})[line.kind] = line.data[0] if line.data else ""
    return [MachineState(n, v.get("state", "unknown"), v.get("provider-name", "")) for n, v in states.items()]


@dataclass(frozen=True)
class SSHConfig:
    """One ``Host`` block of ``vagrant ssh-config``; every value of a repeated key is kept, in order."""

    host: str
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def get(self, key: str, default: str = "") -> str:
        values = self.options.get(key.lower())
        return values[0] if values else default

    @property
    def hostname(self) -> str:
        return self.get("hostname")

    @property
    def port(self) -> int:
        return int(self.get("port", "22"))

    @property
    def user(self) -> str:
        return self.get("user")

    @property
    def identity_files(self) -> tuple[str, ...]:
        return self.options.get("identityfile", ())


def parse_ssh_config(text: str) -> list[SSHConfig]:
    """Parse ``vagrant ssh-config`` output into its ``Host`` blocks (keys lower-cased, as ssh does)."""
    blocks: list[SSHConfig] = []
    current: dict[str, list[str]] | None = None
    host = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?)(?:\s*=\s*|\s+)(.*)$", line)
        if not m:
            continue
        key, value = m.group(1).lower(), m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key == "host":
            if current is not None:
                blocks.append(SSHConfig(host, {k: tuple(v) for k, v in current.items()}))
            host, current = value, {}
            continue
        if current is None:
            continue
        current.setdefault(key, []).append(value)
    if current is not None:
        blocks.append(SSHConfig(host, {k: tuple(v) for k, v in current.items()}))
    return blocks


# Lines of `vagrant up` output (Vagrant 2.3, vagrant-libvirt 0.11) that start a phase.
PHASES: tuple[tuple[str, str], ...] = (
    ("Uploading base box image as volume", "uploading the box image"),
    ("Creating image (snapshot of base box volume)", "creating the disk"),
    ("Creating domain with the following settings", "creating domain"),
    ("Starting domain", "starting domain"),
    ("Waiting for domain to get an IP address", "waiting for IP"),
    ("Waiting for SSH to become available", "waiting for SSH"),
    ("Waiting for machine to boot", "waiting for SSH"),
    ("Machine booted and ready", "booted"),
    ("Machine is booted and ready for use", "booted"),
    ("Running provisioner", "provisioning"),
)


def detect_phase(line: str, current: str) -> str:
    """The phase ``vagrant up`` is in after printing ``line`` (unchanged when the line says nothing)."""
    for marker, phase in PHASES:
        if marker in line:
            return phase
    return current


# -- running Vagrant ------------------------------------------------------------------------------


class _RoutedVagrant(python_vagrant.Vagrant):
    """python-vagrant with every command run by ``appliance.run.run``: streamed, captured, bounded."""

    def __init__(self, root: Path, env: dict[str, str], *, on_line: Callable[[str, str], None] | None = None,
                 timeout: float | None = None) -> None:
        super().__init__(root=str(root), env=env)  # type: ignore[no-untyped-call]
        self.extra_env = env
        self.on_line = on_line
        self.timeout = timeout
        self.last: CommandResult | None = None

    def _exec(self, args: Sequence[str | None], *, show: bool) -> CommandResult:
        command = self._make_vagrant_command(list(args))  # type: ignore[no-untyped-call]
        progress = ProgressThrottle()

        def each_line(stream: str, line: str) -> None:
            text = strip_ansi(line)
            if show and progress.wants(text):
                log.output(text, stderr=(stream == "stderr"))
            if self.on_line is not None:
                self.on_line(stream, text)

        self.last = run(command, cwd=self.root, env=self.extra_env, on_line=each_line, timeout=self.timeout)
        return self.last

    def _call_vagrant_command(self, args: Sequence[str | None]) -> None:
        self._exec(args, show=True)

    def _run_vagrant_command(self, args: Sequence[str | None]) -> str:
        return self._exec(args, show=False).stdout

    def _stream_vagrant_command(self, args: Sequence[str | None]) -> Iterator[str]:
        yield from self._exec(args, show=True).stdout.splitlines(keepends=True)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PROGRESS = re.compile(r"Progress:\s*(\d+)%")


def strip_ansi(line: str) -> str:
    return _ANSI.sub("", line).replace("\r", "")


class ProgressThrottle:
    """Lets through every line except repeated ``Progress: N%`` updates: one per 10 % step."""

    def __init__(self) -> None:
        self.shown = -1

    def wants(self, line: str) -> bool:
        m = _PROGRESS.search(line)
        if not m:
            return True
        step = int(m.group(1)) // 10
        if step == self.shown:
            return False
        self.shown = step
        return True


def project_dir(cfg: ApplianceConfig) -> Path:
    """The build's Vagrant project directory (Vagrantfile and Vagrant's ``.vagrant`` state)."""
    return cfg.build_dir / "vm"


def _env(cfg: ApplianceConfig) -> dict[str, str]:
    env = dict(VAGRANT_ENV)
    if cfg.provider == "libvirt":
        env["LIBVIRT_DEFAULT_URI"] = cfg.libvirt.uri
    return env


_BACKTRACE_FRAME = re.compile(r"^\s+from /\S+:\d+:in ")


def _failure(subcommand: str, exc: CommandFailed, *, phase: str | None = None) -> VagrantError:
    """A ``VagrantError`` naming the Vagrant command and showing the tail of its stderr, with a hint."""
    result = exc.result
    stderr = result.stderr + "\n" + result.stdout
    # Vagrant's Ruby backtraces bury the one line that says what went wrong: leave the frames out.
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not _BACKTRACE_FRAME.match(ln)]
    tail = lines[-STDERR_TAIL:]
    if result.timed_out:
        what = f"timed out after {result.duration:.0f} s" + (f" while {phase}" if phase else "")
    else:
        what = f"exit status {result.returncode}" + (f" while {phase}" if phase else "")
    message = f"`vagrant {subcommand}` failed ({what})"
    if tail:
        message += "\n  last lines of its stderr:\n" + "\n".join(f"    {ln}" for ln in tail)
    hint = _hint_for(stderr, phase, timed_out=result.timed_out)
    return VagrantError(message, hint=hint)


def _hint_for(output: str, phase: str | None, *, timed_out: bool) -> str | None:
    if re.search(r"box '[^']+' could not be found|could not be found or\s+could not be accessed", output):
        return "build and add the base box first: `invoke base-box`"
    if "Error while connecting to Libvirt" in output or "Failed to connect socket" in output:
        return "start libvirt: `systemctl start libvirtd` (without systemd: `virtlogd -d && libvirtd -d`)"
    if "provider 'libvirt' could not be found" in output:
        return "install the plugin: `apt-get install -y --no-install-recommends vagrant-libvirt`"
    if "already taken" in output:
        return "a libvirt domain with this name exists outside this project: `virsh undefine NAME` or set vm.name"
    if timed_out or "Timed out while waiting for the machine to boot" in output:
        where = {
            "creating domain": "libvirt did not finish creating the domain (check `virsh list --all`)",
            "waiting for IP": "the guest got no DHCP lease on the management network (is dnsmasq installed?)",
            "waiting for SSH": "the guest has an address but SSH does not answer (watch it: `virsh console DOMAIN`)",
        }.get(phase or "", "")
        return (where + "; " if where else "") + "raise vm.boot_timeout, or `invoke destroy` and retry"
    return None


def _client(cfg: ApplianceConfig, *, on_line: Callable[[str, str], None] | None = None,
            timeout: float | None = None) -> _RoutedVagrant:
    if which("vagrant") is None:
        raise PrerequisiteMissing("vagrant is not installed", hint="apt-get install -y --no-install-recommends vagrant")
    root = project_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    return _RoutedVagrant(root, _env(cfg), on_line=on_line, timeout=timeout)


def _vagrant(subcommand: str, call: Callable[[], Any], *, phase: Callable[[], str] | None = None) -> Any:
    try:
        return call()
    except CommandFailed as exc:
        raise _failure(subcommand, exc, phase=phase() if phase else None) from None


# -- preflight ------------------------------------------------------------------------------------


def check_libvirt(cfg: ApplianceConfig, *, ensure_pool: bool = True) -> None:
    """libvirtd answers at ``cfg.libvirt.uri``; with ``ensure_pool`` the storage pool exists and runs
    (``default`` is made in /var/lib/libvirt/images if missing)."""
    if which("virsh") is None:
        raise PrerequisiteMissing(
            "virsh (libvirt's client) is not installed",
            hint="apt-get install -y --no-install-recommends libvirt-clients libvirt-daemon-system",
        )
    uri = cfg.libvirt.uri
    probe = run(["virsh", "-c", uri, "uri"], check=False, timeout=30)
    if not probe.ok:
        raise PrerequisiteMissing(
            f"libvirt is not reachable at {uri}: {' '.join(probe.tail('stderr', 2)) or 'no answer'}",
            hint="start it: `systemctl start libvirtd` (without systemd: `virtlogd -d && libvirtd -d`; "
            "docs/vm-lifecycle.md lists what libvirtd needs on a host without libvirt-daemon-system)",
        )
    if not ensure_pool:
        return
    pool = cfg.libvirt.storage_pool
    info = run(["virsh", "-c", uri, "pool-info", pool], check=False, timeout=30)
    if info.ok and re.search(r"^State:\s+running", info.stdout, re.M):
        return
    if info.ok:
        run(["virsh", "-c", uri, "pool-start", pool])
        log.info(f"changed: started libvirt storage pool {pool}")
        return
    if pool != "default":
        raise PrerequisiteMissing(
            f"libvirt storage pool {pool!r} does not exist at {uri}",
            hint=f"create it: virsh pool-define-as {pool} dir --target DIR && virsh pool-build {pool} && "
            f"virsh pool-start {pool}; or set libvirt.storage_pool",
        )
    target = "/var/lib/libvirt/images"
    run(["virsh", "-c", uri, "pool-define-as", pool, "dir", "--target", target])
    run(["virsh", "-c", uri, "pool-build", pool])
    run(["virsh", "-c", uri, "pool-start", pool])
    run(["virsh", "-c", uri, "pool-autostart", pool], check=False)
    log.info(f"changed: created libvirt storage pool {pool} in {target}")


def check_plugin(client: _RoutedVagrant) -> None:
    plugins = _vagrant("plugin list", client.plugin_list)
    if not any(p.name == "vagrant-libvirt" for p in plugins):
        raise PrerequisiteMissing(
            "the vagrant-libvirt plugin is not installed",
            hint="apt-get install -y --no-install-recommends vagrant-libvirt",
        )


def check_box(cfg: ApplianceConfig, client: _RoutedVagrant, provider: str) -> None:
    boxes = _vagrant("box list", client.box_list)
    if not any(b.name == cfg.vm.box and (b.provider or provider) == provider for b in boxes):
        have = ", ".join(sorted({f"{b.name} ({b.provider})" for b in boxes})) or "none"
        version = f" --box-version {cfg.vm.box_version}" if cfg.vm.box_version else ""
        build = (f"`invoke base-box --provider {provider}`" if cfg.vm.box == "csghub/debian12"
                 else f"`vagrant box add {cfg.vm.box}{version} --provider {provider}`")
        raise VagrantError(
            f"Vagrant has no box {cfg.vm.box!r} for provider {provider} (boxes here: {have})",
            hint=f"get it with {build}",
        )


# -- the lifecycle --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedProject:
    """A written Vagrantfile and the libvirt driver it runs the VM with (``None``: VirtualBox)."""

    path: Path
    libvirt_driver: str | None


def render(cfg: ApplianceConfig, output: str | Path | None = None) -> RenderedProject:
    """Write the Vagrantfile: the one render behind ``invoke render``, ``invoke up`` and the build.

    It always carries what ``vagrant up`` needs to give the same VM as the build: the libvirt
    driver resolved like ``appliance.hostprobe`` does it (``auto`` never becomes ``kvm`` on a host
    where KVM hangs guests), and the pinned artifacts and manifests the k3s and CSGHub steps
    read (``ArtifactError`` pointing at ``invoke fetch`` when the cache lacks one, rather than a
    Vagrantfile that fails at the k3s step). ``output`` (a file or directory) defaults to the
    project directory, where the other tasks look for the VM.
    """
    from appliance.digest import sha256_file
    from appliance.hostprobe import resolve_libvirt_driver
    from appliance.render import Upload, render_vagrantfile
    from appliance.steps import pinned_uploads

    driver = resolve_libvirt_driver(cfg.libvirt.driver) if cfg.provider == "libvirt" else None
    uploads = [
        Upload(name=f"{i:02d}-{local.name}", source=str(local), destination=guest, sha256=sha256_file(local))
        for i, (local, guest) in enumerate(pinned_uploads(cfg))
    ]
    target = project_dir(cfg) / "Vagrantfile" if output is None else output
    path = render_vagrantfile(cfg, target, libvirt_driver=driver, uploads=uploads)
    return RenderedProject(path, driver)


def _ensure_project(cfg: ApplianceConfig) -> None:
    if not (project_dir(cfg) / "Vagrantfile").exists():
        render(cfg)


def _has_machine(cfg: ApplianceConfig) -> bool:
    """Whether Vagrant recorded a machine in the project (``.vagrant/machines/<name>/<provider>/id``)."""
    return any((project_dir(cfg) / ".vagrant" / "machines" / MACHINE).glob("*/id"))


def status(cfg: ApplianceConfig) -> MachineState:
    """The build VM's state, from ``vagrant status --machine-readable``."""
    if cfg.provider == "libvirt":
        check_libvirt(cfg, ensure_pool=False)
    if not (project_dir(cfg) / "Vagrantfile").exists() and not _has_machine(cfg):
        # Nothing rendered, nothing created: no need for a Vagrantfile (rendering one needs the artifacts).
        return MachineState(MACHINE, "not_created", cfg.provider)
    _ensure_project(cfg)
    client = _client(cfg)
    out = _vagrant("status", lambda: client._run_vagrant_command(["status", "--machine-readable", MACHINE]))
    machines = parse_status(out)
    if not machines:
        raise VagrantError("`vagrant status --machine-readable` listed no machine", hint="run `invoke render`")
    return machines[0]


def _domain_outside_project(cfg: ApplianceConfig) -> str | None:
    """The state of a libvirt domain with this VM's name that this project does not know, if any."""
    res = run(["virsh", "-c", cfg.libvirt.uri, "domstate", domain_name(cfg)], check=False, timeout=30)
    return res.stdout.strip() if res.ok else None


def up(
    cfg: ApplianceConfig, *, provision: bool = False, timeout: float | None = None, render_first: bool = False
) -> MachineState:
    """Boot the VM from the project's Vagrantfile; a running VM is left as it is.

    ``render_first`` (re-)renders the Vagrantfile first (``invoke up``); otherwise it is
    rendered only when missing (the build pipeline renders it in its own stage).

    Raises ``VMSealed`` when the VM is sealed (or its seal started) and ``VagrantError`` for a
    VM in a state ``up`` cannot handle, a missing box, or a
    boot that does not finish within ``timeout`` (default: vm.boot_timeout plus a margin
    for creating the disk and domain); the error names the phase it was in.
    """
    from appliance.state import refuse_if_sealed

    refuse_if_sealed(cfg, "boot the VM")  # a sealed disk's next boot is the appliance's first boot
    provider = cfg.provider
    if provider == "libvirt":
        check_libvirt(cfg)
    if render_first:
        render(cfg)
    else:
        _ensure_project(cfg)
    client = _client(cfg)
    if provider == "libvirt":
        check_plugin(client)
    current = status(cfg)
    if current.running:
        log.info(f"ok: {cfg.vm.name} is already running")
        return current
    if current.state not in STARTABLE_STATES:
        raise VagrantError(
            f"the VM {cfg.vm.name} exists in state {current.state!r}, which `up` does not resume",
            hint="`invoke destroy` and `invoke up` again (or resume it with `vagrant resume` in "
            f"{project_dir(cfg)})",
        )
    if not current.exists:
        # A new VM has new host keys: forget whatever an earlier VM of this build presented.
        forget_host_key(known_hosts_path(cfg))
        check_box(cfg, client, provider)
        if provider == "libvirt":
            outside = _domain_outside_project(cfg)
            if outside is not None:
                domain = domain_name(cfg)
                raise VagrantError(
                    f"a libvirt domain named {domain!r} already exists ({outside}) but is not this "
                    f"project's VM ({project_dir(cfg)})",
                    hint=f"remove it (virsh destroy {domain}; virsh undefine {domain} --remove-all-storage) "
                    "or set vm.name",
                )
    phase = ["starting vagrant"]

    def watch(_stream: str, line: str) -> None:
        new = detect_phase(line, phase[0])
        if new != phase[0]:
            phase[0] = new
            log.debug(f"up: phase {new}")

    limit = timeout if timeout is not None else cfg.vm.boot_timeout + UP_MARGIN_SECONDS
    booting = _client(cfg, on_line=watch, timeout=limit)
    with log.step(f"vagrant up {cfg.vm.name} ({provider})"):
        _vagrant(
            "up",
            lambda: booting.up(provision=provision, provider=provider),  # type: ignore[no-untyped-call]
            phase=lambda: phase[0],
        )
    final = status(cfg)
    if not final.running:
        raise VagrantError(f"`vagrant up` finished but {cfg.vm.name} is {final.state!r}, not running")
    return final


def halt(cfg: ApplianceConfig, *, force: bool = False) -> MachineState:
    """Shut the VM down (clean ACPI shutdown unless ``force``); nothing to do when it is off or absent."""
    current = status(cfg)
    if current.stopped or not current.exists:
        log.info(f"ok: {cfg.vm.name} is {current.state}, nothing to halt")
        if cfg.provider == "libvirt":
            from appliance import forwards

            forwards.clear(cfg, project_dir(cfg))  # the VM may have powered itself off (seal)
        return current
    client = _client(cfg, timeout=cfg.vm.boot_timeout)
    with log.step(f"vagrant halt {cfg.vm.name}"):
        _vagrant("halt", lambda: client.halt(force=force))  # type: ignore[no-untyped-call]
    final = status(cfg)
    if cfg.provider == "libvirt" and not final.running:
        from appliance import forwards

        forwards.clear(cfg, project_dir(cfg))
    return final


def destroy(cfg: ApplianceConfig) -> None:
    """Remove the VM and its disks; nothing to do when it does not exist."""
    current = status(cfg)
    if not current.exists:
        log.info(f"ok: {cfg.vm.name} does not exist, nothing to destroy")
        return
    client = _client(cfg, timeout=cfg.vm.boot_timeout)
    with log.step(f"vagrant destroy {cfg.vm.name}"):
        _vagrant("destroy", client.destroy)
    forget_host_key(known_hosts_path(cfg))


def domain_name(cfg: ApplianceConfig) -> str:
    """The libvirt domain of the build VM: Vagrantfile.j2 sets the prefix ``<vm.name>_``, the machine is ``default``."""
    return f"{cfg.vm.name}_{MACHINE}"


def ssh_config(cfg: ApplianceConfig) -> SSHEndpoint:
    """Host, port, user and every identity file of the running VM, from ``vagrant ssh-config``."""
    _ensure_project(cfg)
    client = _client(cfg)
    out = _vagrant("ssh-config", lambda: client._run_vagrant_command(["ssh-config", MACHINE]))
    blocks = parse_ssh_config(out)
    if not blocks:
        raise VagrantError("`vagrant ssh-config` printed no Host block", hint="is the VM running? `invoke status`")
    block = blocks[0]
    if not block.hostname or not block.user:
        raise VagrantError(f"`vagrant ssh-config` gave no HostName or User for {block.host!r}")
    return SSHEndpoint(host=block.hostname, port=block.port, user=block.user,
                       identity_files=tuple(Path(p) for p in block.identity_files))
