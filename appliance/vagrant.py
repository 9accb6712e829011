"""Up stage: drive the rendered Vagrantfile with Vagrant, on whichever provider the config names.

The build's Vagrant project is ``cfg.build_dir / "vm"`` (``project_dir``), for every task:
``render`` writes the Vagrantfile there (the one render: the driver the provider resolves,
pinned uploads included), ``up`` boots the VM from it. What differs between providers
(environment, preflight, clean-up after a halt) the ``appliance.providers.Provider`` says.

Vagrant is called one way: ``Vagrant.run`` builds the argv and runs it through
``appliance.run.run`` (lines streamed and captured, a timeout, the child interrupted with the
caller on Ctrl-C, every command logged under ``--debug``); a failure becomes a ``VagrantError``
naming the command with the tail of its stderr and a hint. python-vagrant's public API can do
none of the three (no timeout, stderr not captured, only ``up`` streams, through a generator
that must be consumed), so it is not used (docs/architecture.md).

Output is read with one parser of ``--machine-readable`` lines (``status``, ``box list``,
``plugin list``), and ``vagrant ssh-config`` with ``paramiko.SSHConfig``, which keeps every
``IdentityFile`` line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko

from appliance.config import BUILT_BOX, ApplianceConfig
from appliance.errors import CommandFailed, GuestStopped, PrerequisiteMissing, VagrantError
from appliance.log import log
from appliance.run import CommandResult, run, which
from appliance.ssh import SSHEndpoint, forget_host_key, known_hosts_path

if TYPE_CHECKING:  # pragma: no cover
    from appliance.providers.base import Provider

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
# Bound for the quick queries (status, ssh-config, box and plugin lists): Vagrant starts in seconds.
QUERY_TIMEOUT = 300


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
class Box:
    """One box of ``vagrant box list --machine-readable``."""

    name: str
    provider: str
    version: str


def parse_box_list(text: str) -> list[Box]:
    """Boxes from ``vagrant box list --machine-readable`` (``box-name``, then its provider and version)."""
    boxes: list[Box] = []
    name = provider = ""
    for line in parse_machine_readable(text):
        value = line.data[0] if line.data else ""
        if line.kind == "box-name":
            name, provider = value, ""
        elif line.kind == "box-provider":
            provider = value
        elif line.kind == "box-version" and name:
            boxes.append(Box(name, provider, value))
    return boxes


def parse_plugin_list(text: str) -> dict[str, str]:
    """``{plugin: version}`` from ``vagrant plugin list --machine-readable``."""
    plugins: dict[str, str] = {}
    for line in parse_machine_readable(text):
        if line.kind == "plugin-name" and line.data:
            plugins[line.data[0]] = ""
        elif line.kind == "plugin-version" and line.target in plugins and line.data:
            plugins[line.target] = line.data[0]
    return plugins


def parse_ssh_config(text: str, host: str = "default") -> SSHEndpoint:
    """The ``Host`` block for ``host`` in ``vagrant ssh-config`` output, read by ``paramiko.SSHConfig``.

    Every ``IdentityFile`` line is kept, in order (python-vagrant's parser kept only the last).
    """
    parsed = paramiko.SSHConfig.from_text(text)
    if host not in parsed.get_hostnames():
        raise VagrantError(f"`vagrant ssh-config` printed no Host block for {host!r}",
                           hint="is the VM running? `invoke status`")
    block = parsed.lookup(host)
    user = block.get("user", "")
    # paramiko fills in the Host name when HostName is missing: Vagrant always prints one.
    if "hostname" not in _keys(text) or not user:
        raise VagrantError(f"`vagrant ssh-config` gave no HostName or User for {host!r}")
    try:
        port = int(block.get("port", "22"))
    except ValueError:
        raise VagrantError(f"`vagrant ssh-config` gave port {block.get('port')!r} for {host!r}") from None
    return SSHEndpoint(host=block["hostname"], port=port, user=user,
                       identity_files=tuple(Path(p) for p in block.get("identityfile", [])))


def _keys(text: str) -> set[str]:
    return {ln.split(None, 1)[0].split("=", 1)[0].lower() for ln in text.splitlines() if ln.strip()}


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


class Vagrant:
    """The one way this tool runs Vagrant: argv through ``appliance.run.run``, in one project directory.

    ``root`` is the Vagrant project (``None``: commands that need none, such as ``box add``);
    ``env`` adds to :data:`VAGRANT_ENV` (the provider's variables).
    """

    def __init__(self, root: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        executable = which("vagrant")
        if executable is None:
            raise PrerequisiteMissing("vagrant is not installed",
                                      hint="apt-get install -y --no-install-recommends vagrant")
        self.executable = executable
        self.root = root
        self.env = {**VAGRANT_ENV, **(env or {})}

    def run(self, *args: str, show: bool = False, timeout: float | None = QUERY_TIMEOUT,
            on_line: Callable[[str, str], None] | None = None,
            phase: Callable[[], str] | None = None,
            watchdog: Callable[[], GuestStopped | None] | None = None) -> CommandResult:
        """Run ``vagrant ARGS``; ``show`` prints its output (``Progress: N%`` thinned); a failure or
        timeout raises ``VagrantError`` (``phase`` names what it was doing, for the message).
        ``watchdog``: see ``appliance.run.run`` (``up`` passes the provider's check of the booting VM)."""
        progress = ProgressThrottle()

        def each_line(stream: str, line: str) -> None:
            text = strip_ansi(line)
            if show and progress.wants(text):
                log.output(text, stderr=(stream == "stderr"))
            if on_line is not None:
                on_line(stream, text)

        try:
            return run([self.executable, *args], cwd=self.root, env=self.env, on_line=each_line, timeout=timeout,
                       watchdog=watchdog, watch_every=3.0)
        except CommandFailed as exc:
            # Named as a user would say it: `vagrant box add`, `vagrant up` (no flags, machine or paths).
            words = [a for a in args[:2] if not a.startswith("-") and a != MACHINE and "/" not in a]
            raise _failure(" ".join(words), exc, phase=phase() if phase else None) from None


def plugins() -> dict[str, str]:
    """Vagrant's installed plugins and their versions."""
    return parse_plugin_list(Vagrant().run("plugin", "list", "--machine-readable").stdout)


def box_list() -> list[Box]:
    """The boxes Vagrant has (``vagrant box list``)."""
    return parse_box_list(Vagrant().run("box", "list", "--machine-readable").stdout)


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


_BACKTRACE_FRAME = re.compile(r"^\s+from /\S+:\d+:in ")


def _failure(subcommand: str, exc: CommandFailed, *, phase: str | None = None) -> VagrantError:
    """A ``VagrantError`` naming the Vagrant command and showing the tail of its stderr, with a hint."""
    result = exc.result
    stderr = result.stderr + "\n" + result.stdout
    # Vagrant's Ruby backtraces bury the one line that says what went wrong: leave the frames out.
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not _BACKTRACE_FRAME.match(ln)]
    source = "stderr"
    if not lines:
        source = "error report"
        # With --machine-readable, Vagrant reports its error on stdout, as an `error-exit` line.
        for line in parse_machine_readable(result.stdout):
            if line.kind == "error-exit":
                lines += [ln for ln in " ".join(line.data[1:] or line.data).splitlines() if ln.strip()]
    tail = lines[-STDERR_TAIL:]
    if result.timed_out:
        what = f"timed out after {result.duration:.0f} s" + (f" while {phase}" if phase else "")
    else:
        what = f"exit status {result.returncode}" + (f" while {phase}" if phase else "")
    message = f"`vagrant {subcommand}` failed ({what})"
    if tail:
        message += f"\n  last lines of its {source}:\n" + "\n".join(f"    {ln}" for ln in tail)
    hint = _hint_for(stderr, phase, timed_out=result.timed_out)
    return VagrantError(message, hint=hint)


def _hint_for(output: str, phase: str | None, *, timed_out: bool) -> str | None:
    if re.search(r"box '[^']+' could not be found|could not be found or\s+could not be accessed", output):
        return "build and add the base box first: `invoke base-box`"
    if "Error while connecting to Libvirt" in output or "Failed to connect socket" in output:
        from appliance.providers.libvirt.libvirtd import start_hint

        return start_hint()
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


def _provider(cfg: ApplianceConfig, provider: Provider | None) -> Provider:
    if provider is not None:
        return provider
    from appliance.providers.registry import provider_for

    return provider_for(cfg)


def _project(cfg: ApplianceConfig, provider: Provider) -> Vagrant:
    """The Vagrant client for the build's project directory (made if missing)."""
    root = project_dir(cfg)
    client = Vagrant(root, provider.vagrant_env())
    root.mkdir(parents=True, exist_ok=True)
    return client


def check_box(cfg: ApplianceConfig, provider_name: str) -> None:
    """Vagrant has the box ``vm.box`` for this provider; else an error saying how to get it."""
    boxes = box_list()
    if not any(b.name == cfg.vm.box and (b.provider or provider_name) == provider_name for b in boxes):
        have = ", ".join(sorted({f"{b.name} ({b.provider})" for b in boxes})) or "none"
        version = f" --box-version {cfg.vm.box_version}" if cfg.vm.box_version else ""
        build = (f"`invoke base-box --provider {provider_name}`" if cfg.vm.box == BUILT_BOX
                 else f"`vagrant box add {cfg.vm.box}{version} --provider {provider_name}`")
        raise VagrantError(
            f"Vagrant has no box {cfg.vm.box!r} for provider {provider_name} (boxes here: {have})",
            hint=f"get it with {build}",
        )


# -- the lifecycle --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedProject:
    """A written Vagrantfile and the hypervisor driver the provider resolved for it (``None``: VirtualBox)."""

    path: Path
    libvirt_driver: str | None


def render(cfg: ApplianceConfig, output: str | Path | None = None, *,
           provider: Provider | None = None) -> RenderedProject:
    """Write the Vagrantfile: the one render behind ``invoke render``, ``invoke up`` and the build.

    It always carries what ``vagrant up`` needs to give the same VM as the build: the driver
    the provider resolves (libvirt ``auto`` probed by ``appliance.providers.libvirt.hostprobe``, never guessed as
    ``kvm`` on a host where KVM hangs guests), and the pinned artifacts and manifests the k3s
    and CSGHub steps read (``ArtifactError`` pointing at ``invoke fetch`` when the cache lacks
    one, rather than a Vagrantfile that fails at the k3s step). ``output`` (a file or
    directory) defaults to the project directory, where the other tasks look for the VM.
    """
    from appliance.digest import sha256_file
    from appliance.render import Upload, render_vagrantfile
    from appliance.steps import pinned_uploads

    driver = _provider(cfg, provider).resolve_driver()
    uploads = [
        Upload(name=f"{i:02d}-{local.name}", source=str(local), destination=guest, sha256=sha256_file(local))
        for i, (local, guest) in enumerate(pinned_uploads(cfg))
    ]
    target = project_dir(cfg) / "Vagrantfile" if output is None else output
    path = render_vagrantfile(cfg, target, libvirt_driver=driver, uploads=uploads)
    return RenderedProject(path, driver)


def _ensure_project(cfg: ApplianceConfig, provider: Provider) -> None:
    if not (project_dir(cfg) / "Vagrantfile").exists():
        render(cfg, provider=provider)


def _has_machine(cfg: ApplianceConfig) -> bool:
    """Whether Vagrant recorded a machine in the project (``.vagrant/machines/<name>/<provider>/id``)."""
    return any((project_dir(cfg) / ".vagrant" / "machines" / MACHINE).glob("*/id"))


def status(cfg: ApplianceConfig, *, provider: Provider | None = None) -> MachineState:
    """The build VM's state, from ``vagrant status --machine-readable``."""
    provider = _provider(cfg, provider)
    provider.check_reachable()
    if not (project_dir(cfg) / "Vagrantfile").exists() and not _has_machine(cfg):
        # Nothing rendered, nothing created: no need for a Vagrantfile (rendering one needs the artifacts).
        return MachineState(MACHINE, "not_created", provider.name)
    _ensure_project(cfg, provider)
    out = _project(cfg, provider).run("status", "--machine-readable", MACHINE).stdout
    machines = parse_status(out)
    if not machines:
        raise VagrantError("`vagrant status --machine-readable` listed no machine", hint="run `invoke render`")
    return machines[0]


def up(
    cfg: ApplianceConfig, *, provision: bool = False, timeout: float | None = None, render_first: bool = False,
    provider: Provider | None = None, build_box: bool = False,
) -> MachineState:
    """Boot the VM from the project's Vagrantfile; a running VM is left as it is.

    ``render_first`` (re-)renders the Vagrantfile first (``invoke up``); otherwise it is
    rendered only when missing (the build pipeline renders it in its own stage). ``build_box``
    (``invoke up``) builds the base box first when a new VM needs it and Vagrant lacks it (the
    pipeline has its own ``base-box`` stage).

    Raises ``VMSealed`` when the VM is sealed (or its seal started) and ``VagrantError`` for a
    VM in a state ``up`` cannot handle, a missing box, or a
    boot that does not finish within ``timeout`` (default: vm.boot_timeout plus a margin
    for creating the disk and domain); the error names the phase it was in.

    While Vagrant waits, the provider's watch checks the VM every few seconds: a VM that stopped
    running (libvirt: paused, crashed, shut off) raises ``GuestStopped`` with the reason from
    the hypervisor's log at once. Under libvirt driver ``auto``, a VM that KVM could not run is
    removed and booted once more under TCG, loudly, and the probe's cache is corrected.
    """
    from appliance.state import refuse_if_sealed

    refuse_if_sealed(cfg, "boot the VM")  # a sealed disk's next boot is the appliance's first boot
    provider = _provider(cfg, provider)
    provider.preflight()
    if build_box and not _has_machine(cfg):
        # Before the render: the KVM probe boots this box's kernel.
        from appliance.basebox import ensure_base_box

        log.info(f"base box: {ensure_base_box(cfg).note}")
    if render_first:
        render(cfg, provider=provider)
    else:
        _ensure_project(cfg, provider)
    current = status(cfg, provider=provider)
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
        check_box(cfg, provider.name)
        provider.before_create()
    driver = rendered_driver(cfg)
    limit = timeout if timeout is not None else cfg.vm.boot_timeout + UP_MARGIN_SECONDS
    try:
        _run_up(cfg, provider, driver, provision=provision, limit=limit)
    except GuestStopped as exc:
        if not provider.can_fall_back(driver):
            raise
        from appliance.providers.libvirt.hostprobe import record_kvm_failure

        record_kvm_failure(exc.reason)
        log.warning(f"KVM could not run {cfg.vm.name} ({exc.reason}); removing it and booting it again under TCG "
                    "emulation (slower); TCG is used for every boot on this host until it restarts")
        destroy(cfg, provider=provider)
        # The domain is defined anew from a Vagrantfile that names TCG, whatever the probe's cache says.
        tcg = cfg.model_copy(update={"libvirt": cfg.libvirt.model_copy(update={"driver": "qemu"})})
        from appliance.providers.registry import provider_for

        render(tcg, provider=provider_for(tcg))
        forget_host_key(known_hosts_path(cfg))
        _run_up(cfg, provider, rendered_driver(cfg), provision=provision, limit=limit)
    final = status(cfg, provider=provider)
    if not final.running:
        raise VagrantError(f"`vagrant up` finished but {cfg.vm.name} is {final.state!r}, not running")
    return final


_QEMU_ERROR = re.compile(r"(KVM internal error.*|Could not access KVM kernel module.*|qemu-system-\S+: .*)")


def qemu_start_failure(message: str) -> str:
    """QEMU's own lines inside a failed ``vagrant up`` (vagrant-libvirt wraps them in a Ruby error), or ""."""
    found = []
    for line in message.splitlines():
        m = _QEMU_ERROR.search(line)
        if m:
            found.append(re.sub(r"\s*\(Libvirt::Error\)\s*$", "", m.group(1)).strip())
    return "; ".join(dict.fromkeys(found))


def _run_up(cfg: ApplianceConfig, provider: Provider, driver: str | None, *, provision: bool, limit: float) -> None:
    """One ``vagrant up``, watched: a VM that stops running (or a KVM that cannot start it) is ``GuestStopped``."""
    phase = ["starting vagrant"]

    def watch(_stream: str, line: str) -> None:
        new = detect_phase(line, phase[0])
        if new != phase[0]:
            phase[0] = new
            log.debug(f"up: phase {new}")

    with log.step(f"vagrant up {cfg.vm.name} ({provider.name}{', ' + driver if driver else ''})"):
        try:
            _project(cfg, provider).run(
                "up", MACHINE, "--provision" if provision else "--no-provision", f"--provider={provider.name}",
                show=True, timeout=limit, on_line=watch, phase=lambda: phase[0], watchdog=provider.guest_watch(driver),
            )
        except VagrantError as exc:
            # QEMU died as libvirt started it under KVM (vagrant-libvirt shows it inside a Ruby error).
            why = qemu_start_failure(exc.message) if driver == "kvm" else ""
            if why:
                raise GuestStopped(f"{exc.message}\n  KVM could not start {cfg.vm.name}: {why}",
                                   reason=why, accelerator="kvm",
                                   hint="set libvirt.driver=qemu (TCG), or auto to let the tool fall back; "
                                        "`invoke doctor` shows whether libvirt's QEMU user can open /dev/kvm") from None
            raise


def rendered_driver(cfg: ApplianceConfig) -> str | None:
    """The libvirt driver the project's Vagrantfile names (``lv.driver = "kvm"``), or None (none, or VirtualBox)."""
    try:
        text = (project_dir(cfg) / "Vagrantfile").read_text()
    except OSError:
        return None
    found = re.search(r"^\s*lv\.driver = ['\"](\w+)['\"]", text, re.M)
    return found.group(1) if found else None


def halt(cfg: ApplianceConfig, *, force: bool = False, provider: Provider | None = None) -> MachineState:
    """Shut the VM down (clean ACPI shutdown unless ``force``); nothing to do when it is off or absent."""
    provider = _provider(cfg, provider)
    current = status(cfg, provider=provider)
    if current.stopped or not current.exists:
        log.info(f"ok: {cfg.vm.name} is {current.state}, nothing to halt")
        provider.after_halt(project_dir(cfg))  # the VM may have powered itself off (seal)
        return current
    with log.step(f"vagrant halt {cfg.vm.name}"):
        _project(cfg, provider).run("halt", MACHINE, *(["--force"] if force else []), show=True,
                                    timeout=cfg.vm.boot_timeout)
    final = status(cfg, provider=provider)
    if not final.running:
        provider.after_halt(project_dir(cfg))
    return final


def destroy(cfg: ApplianceConfig, *, provider: Provider | None = None) -> None:
    """Remove the VM and its disks; nothing to do when it does not exist."""
    provider = _provider(cfg, provider)
    current = status(cfg, provider=provider)
    if not current.exists:
        log.info(f"ok: {cfg.vm.name} does not exist, nothing to destroy")
        return
    with log.step(f"vagrant destroy {cfg.vm.name}"):
        _project(cfg, provider).run("destroy", "--force", MACHINE, show=True, timeout=cfg.vm.boot_timeout)
    forget_host_key(known_hosts_path(cfg))


def ssh_config(cfg: ApplianceConfig, *, provider: Provider | None = None) -> SSHEndpoint:
    """Host, port, user and every identity file of the running VM, from ``vagrant ssh-config``."""
    provider = _provider(cfg, provider)
    _ensure_project(cfg, provider)
    return parse_ssh_config(_project(cfg, provider).run("ssh-config", MACHINE).stdout, MACHINE)
