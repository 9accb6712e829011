"""The build VM's lifecycle: render its Vagrant project, boot, query, halt, remove, for one provider.

The project is ``cfg.build_dir / "vm"`` (``vagrant.project_dir``) for every task. Every function
takes the ``Provider`` it works for (``providers.registry.provider_for``, built once by the
caller) and asks each question once per call: the hypervisor's reachability (the preflight of a
boot is that question), the VM's state, whether the build sealed it. Nothing here renders on its
own: ``render`` writes the Vagrantfile when a caller asks (``invoke render``, ``invoke up``, the
build's render stage, the KVM-to-TCG retry of ``up``). ``status`` and ``destroy`` need no
Vagrantfile, so no artifacts either: with none written they ask the hypervisor about the machine
Vagrant recorded (``Provider.machine_state`` / ``remove_machine``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from appliance.basebox import ensure_base_box
from appliance.config import BUILT_BOX, ApplianceConfig
from appliance.errors import GuestStopped, VagrantError
from appliance.log import log
from appliance.providers.base import Provider
from appliance.render import pinned_render_uploads, render_vagrantfile
from appliance.ssh import SSHEndpoint, forget_host_key, known_hosts_path
from appliance.state import refuse_if_sealed
from appliance.steps import Options, PlannedStep, ProvisionReport, provision_vagrant_vm
from appliance.vagrant import (
    MACHINE,
    MachineState,
    Vagrant,
    box_list,
    detect_phase,
    parse_ssh_config,
    parse_status,
    project_dir,
)

# States in which `vagrant up` (re)starts the machine.
STARTABLE_STATES = {"not_created", "poweroff", "shutoff", "running"}
# Time beyond vm.boot_timeout that `up` may take: uploading the box image, creating the domain.
UP_MARGIN_SECONDS = 600


@dataclass(frozen=True)
class RenderedProject:
    """A written Vagrantfile and the hypervisor driver the provider resolved for it (``None``: VirtualBox)."""

    path: Path
    libvirt_driver: str | None


def render(cfg: ApplianceConfig, provider: Provider, output: str | Path | None = None) -> RenderedProject:
    """Write the Vagrantfile: the one render behind ``invoke render``, ``invoke up`` and the build.

    It always carries what ``vagrant up`` needs to give the same VM as the build: the driver
    the provider resolves (libvirt ``auto`` probed by ``providers.libvirt.hostprobe``, never
    guessed as ``kvm`` on a host where KVM hangs guests), and the pinned artifacts and manifests
    the k3s and CSGHub steps read (``ArtifactError`` pointing at ``invoke fetch`` when the cache
    lacks one, rather than a Vagrantfile that fails at the k3s step). ``output`` (a file or
    directory) defaults to the project directory, where the other tasks look for the VM.
    """
    driver = provider.resolve_driver()
    uploads = pinned_render_uploads(cfg)
    target = vagrantfile(cfg) if output is None else output
    path = render_vagrantfile(cfg, target, libvirt_driver=driver, uploads=uploads)
    return RenderedProject(path, driver)


def vagrantfile(cfg: ApplianceConfig) -> Path:
    return project_dir(cfg) / "Vagrantfile"


def rendered_driver(cfg: ApplianceConfig, provider: Provider) -> str | None:
    """The hypervisor driver the project's Vagrantfile names (``None``: none, or VirtualBox)."""
    return provider.rendered_driver(vagrantfile(cfg))


def _project(cfg: ApplianceConfig, provider: Provider) -> Vagrant:
    """The Vagrant client for the build's project directory (made if missing)."""
    root = project_dir(cfg)
    client = Vagrant(root, provider.vagrant_env(), hint=provider.failure_hint)
    root.mkdir(parents=True, exist_ok=True)
    return client


def _machine_dir(cfg: ApplianceConfig, provider: Provider) -> Path:
    return project_dir(cfg) / ".vagrant" / "machines" / MACHINE / provider.name


def _machine_id(cfg: ApplianceConfig, provider: Provider) -> str | None:
    """The hypervisor's id of the VM Vagrant recorded in the project (``.vagrant/machines/<name>/<provider>/id``)."""
    try:
        return (_machine_dir(cfg, provider) / "id").read_text().strip() or None
    except OSError:
        return None


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


# -- questions -------------------------------------------------------------------------------------


def _query(cfg: ApplianceConfig, provider: Provider) -> MachineState:
    """``vagrant status`` of the project (its Vagrantfile exists; the hypervisor was found reachable)."""
    out = _project(cfg, provider).run("status", "--machine-readable", MACHINE).stdout
    machines = parse_status(out)
    if not machines:
        raise VagrantError("`vagrant status --machine-readable` listed no machine", hint="run `invoke render`")
    return machines[0]


def status(cfg: ApplianceConfig, provider: Provider) -> MachineState:
    """The build VM's state: ``vagrant status``, or the hypervisor's answer when no Vagrantfile is written."""
    machine_id = _machine_id(cfg, provider)
    if not vagrantfile(cfg).exists():
        if machine_id is None:  # nothing rendered, nothing created: nothing to ask anyone
            return MachineState(MACHINE, "not_created", provider.name)
        provider.check_reachable()
        return MachineState(MACHINE, provider.machine_state(machine_id), provider.name)
    provider.check_reachable()
    return _query(cfg, provider)


def _require_project(cfg: ApplianceConfig, action: str) -> None:
    if not vagrantfile(cfg).exists():
        raise VagrantError(f"cannot {action}: there is no Vagrantfile in {project_dir(cfg)}",
                           hint="`invoke up` renders it and boots the VM (`invoke render` only writes it)")


# -- actions ---------------------------------------------------------------------------------------


def up(
    cfg: ApplianceConfig, provider: Provider, *, provision: bool = False, timeout: float | None = None,
    render_first: bool = False, build_box: bool = False,
) -> MachineState:
    """``invoke up``: refuse a sealed VM, then :func:`boot` it.

    Raises ``VMSealed`` when the VM is sealed (or its seal started): a sealed disk's next boot is
    the appliance's first boot.
    """
    refuse_if_sealed(cfg, "boot the VM")
    return boot(cfg, provider, provision=provision, timeout=timeout, render_first=render_first,
                build_box=build_box)


def boot(
    cfg: ApplianceConfig, provider: Provider, *, provision: bool = False, timeout: float | None = None,
    render_first: bool = False, build_box: bool = False,
) -> MachineState:
    """Boot the VM from the project's Vagrantfile; a running VM is left as it is. The caller knows it
    is not sealed (:func:`up` checks; the build's up stage reads its own state).

    ``render_first`` (re-)renders the Vagrantfile first (``invoke up``); otherwise it must exist
    (the build renders it in its own stage). ``build_box`` (``invoke up``) builds the base box
    first when a new VM needs it and Vagrant lacks it (the build has its own ``base-box`` stage).

    Raises ``VagrantError`` for a VM in a state ``up`` cannot handle, a missing box, or a boot
    that does not finish within ``timeout`` (default: vm.boot_timeout plus a margin for creating
    the disk and domain); the error names the phase it was in.

    While Vagrant waits, the provider's watch checks the VM every few seconds: a VM that stopped
    running (libvirt: paused, crashed, shut off) raises ``GuestStopped`` with the reason from
    the hypervisor's log at once. When the provider allows it (libvirt driver ``auto`` chose
    KVM), a VM that KVM could not run is removed and booted once more under TCG, loudly, and the
    probe's cache is corrected.
    """
    provider.preflight()  # the reachability question, asked once for the whole boot
    if build_box and _machine_id(cfg, provider) is None:
        # Before the render: the KVM probe boots this box's kernel.
        log.info(f"base box: {ensure_base_box(cfg, provider).note}")
    if render_first:
        render(cfg, provider)
    _require_project(cfg, "boot the VM")
    current = _query(cfg, provider)
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
    driver = rendered_driver(cfg, provider)
    limit = timeout if timeout is not None else cfg.vm.boot_timeout + UP_MARGIN_SECONDS
    try:
        _run_up(cfg, provider, driver, provision=provision, limit=limit)
    except GuestStopped as exc:
        if not provider.can_fall_back(driver):
            raise
        slower = provider.fall_back(exc.reason)
        log.warning(f"KVM could not run {cfg.vm.name} ({exc.reason}); removing it and booting it again under TCG "
                    "emulation (slower); TCG is used for every boot on this host until it restarts")
        _destroy(cfg, provider)
        # The domain is defined anew from a Vagrantfile that names TCG, whatever the probe's cache says.
        render(slower.cfg, slower)
        forget_host_key(known_hosts_path(cfg))
        _run_up(cfg, provider, rendered_driver(cfg, provider), provision=provision, limit=limit)
    # `vagrant up` returns once the machine booted and answers SSH: no second question needed.
    return MachineState(MACHINE, "running", provider.name)


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
            why = provider.start_failure(exc.message, driver)
            if why:
                raise GuestStopped(f"{exc.message}\n  KVM could not start {cfg.vm.name}: {why}",
                                   reason=why, accelerator="kvm",
                                   hint="set libvirt.driver=qemu (TCG), or auto to let the tool fall back; "
                                        "`invoke doctor` shows whether libvirt's QEMU user can open /dev/kvm") from None
            raise


def halt(cfg: ApplianceConfig, provider: Provider, *, force: bool = False) -> MachineState:
    """Shut the VM down (clean ACPI shutdown unless ``force``); nothing to do when it is off or absent."""
    current = status(cfg, provider)
    if current.stopped or not current.exists:
        log.info(f"ok: {cfg.vm.name} is {current.state}, nothing to halt")
        provider.after_halt(project_dir(cfg))  # the VM may have powered itself off (seal)
        return current
    _require_project(cfg, "halt the VM")
    with log.step(f"vagrant halt {cfg.vm.name}"):
        _project(cfg, provider).run("halt", MACHINE, *(["--force"] if force else []), show=True,
                                    timeout=cfg.vm.boot_timeout)
    final = _query(cfg, provider)  # what the halt left (a clean shutdown the guest refused: still running)
    if not final.running:
        provider.after_halt(project_dir(cfg))
    return final


def destroy(cfg: ApplianceConfig, provider: Provider) -> None:
    """Remove the VM and its disks; nothing to do when it does not exist. Needs no Vagrantfile."""
    current = status(cfg, provider)
    if not current.exists:
        log.info(f"ok: {cfg.vm.name} does not exist, nothing to destroy")
        return
    _destroy(cfg, provider)


def _destroy(cfg: ApplianceConfig, provider: Provider) -> None:
    machine_id = _machine_id(cfg, provider)
    if vagrantfile(cfg).exists() or machine_id is None:
        with log.step(f"vagrant destroy {cfg.vm.name}"):
            _project(cfg, provider).run("destroy", "--force", MACHINE, show=True, timeout=cfg.vm.boot_timeout)
    else:
        # No Vagrantfile, so no Vagrant command works here: the hypervisor removes the machine Vagrant recorded.
        with log.step(f"remove {cfg.vm.name} ({provider.name} {machine_id}) without a Vagrantfile"):
            provider.remove_machine(machine_id, _machine_dir(cfg, provider))
            shutil.rmtree(_machine_dir(cfg, provider))
            log.info(f"changed: removed the VM {machine_id} and Vagrant's record of it")
        provider.after_halt(project_dir(cfg))
    forget_host_key(known_hosts_path(cfg))


def ssh_config(cfg: ApplianceConfig, provider: Provider) -> SSHEndpoint:
    """Host, port, user and every identity file of the running VM, from ``vagrant ssh-config``."""
    _require_project(cfg, "reach the VM")
    return parse_ssh_config(_project(cfg, provider).run("ssh-config", MACHINE).stdout, MACHINE)


def provision(cfg: ApplianceConfig, provider: Provider, options: Options | None = None, *,
              list_plan: bool = False) -> ProvisionReport | list[PlannedStep]:
    """``invoke provision``: refuse a sealed VM, find the running VM through ``vagrant ssh-config``,
    then show the plan (``list_plan``) or provision it (``steps.provision_vagrant_vm``)."""
    refuse_if_sealed(cfg, "provision the VM")
    return provision_vagrant_vm(cfg, ssh_config(cfg, provider), options or Options(), list_plan=list_plan)
