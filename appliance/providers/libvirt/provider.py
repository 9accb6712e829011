"""libvirt/QEMU through vagrant-libvirt: the Linux build host's and CI's provider, and our tests'.

Host checks (shared by ``invoke doctor`` and the preflight before ``vagrant up``): QEMU,
qemu-img, virsh, libvirtd, libvirt answering at ``libvirt.uri``, the vagrant-libvirt plugin,
and whether KVM really accelerates (``hostprobe`` beside this module). The storage pool is not a
check: the preflight makes sure it exists and runs (``ensure_storage_pool``, an explicit action
that says what it changed). The disk is the domain's only hard disk; the OVA is written by our
own writer (``export`` beside this module). The verify stage boots a copy under QEMU. What
vagrant-libvirt's errors mean (``failure_hint``) and how a VM is removed without Vagrant
(``remove_machine``) are here too.
"""

from __future__ import annotations

import re
from pathlib import Path

from appliance.checks import Check, require, tool_check
from appliance.config import ApplianceConfig
from appliance.errors import GuestStopped, PrerequisiteMissing, UsageError, VagrantError
from appliance.log import log
from appliance.providers.base import Exported, Provider
from appliance.providers.libvirt import forwards, hostprobe, libvirtd
from appliance.providers.libvirt.box import package_libvirt_box
from appliance.providers.libvirt.export import export_libvirt, find_domain_disk
from appliance.providers.libvirt.libvirtd import QEMU_LOG_DIR, has_stopped, parse_domstate
from appliance.run import run, which
from appliance.vagrant import MACHINE, plugins, project_dir

APT = "apt-get install --no-install-recommends "
PLUGIN = "vagrant-libvirt"
DEFAULT_POOL_DIR = "/var/lib/libvirt/images"


def domain_name(cfg: ApplianceConfig) -> str:
    """The libvirt domain of the build VM: Vagrantfile.j2 sets the prefix ``<vm.name>_``, the machine is ``default``."""
    return f"{cfg.vm.name}_{MACHINE}"


# -- watching a booting domain --------------------------------------------------------------------

def domain_log_reason(domain: str, log_dir: Path = QEMU_LOG_DIR) -> str:
    """Why the domain's QEMU stopped, from libvirt's log of its latest start (``<log_dir>/<domain>.log``)."""
    lines = hostprobe.domain_failure_lines(domain, log_dir)
    path = log_dir / f"{domain}.log"
    if lines is None:
        return f"no log at {path}"
    return "; ".join(lines) if lines else f"nothing in {path} says why"


class DomainWatch:
    """While ``vagrant up`` waits: is the build VM's domain still running? (``None``: yes, or not started yet.)

    A domain that was running and now is paused (``KVM internal error``, ``virsh suspend``),
    crashed or shut off will never get an address: ``GuestStopped`` names its state and the
    reason from libvirt's domain log, so ``up`` fails in seconds instead of at its timeout.
    """

    def __init__(self, cfg: ApplianceConfig, driver: str, log_dir: Path = QEMU_LOG_DIR) -> None:
        self.uri, self.domain, self.driver, self.log_dir = cfg.libvirt.uri, domain_name(cfg), driver, log_dir
        self.seen_running = False

    def __call__(self) -> GuestStopped | None:
        probe = run(["virsh", "-c", self.uri, "domstate", "--reason", self.domain], check=False, timeout=30)
        if not probe.ok:
            return None  # not defined yet
        state, reason = parse_domstate(probe.stdout)
        if state == "running":
            self.seen_running = True
            return None
        if not has_stopped(state, reason) or (state == "shut off" and not self.seen_running):
            return None  # alive ("blocked": waiting on I/O), still starting, or not started yet
        why = domain_log_reason(self.domain, self.log_dir)
        return GuestStopped(
            f"the libvirt domain {self.domain} stopped running under {self.driver}: {state} ({reason}): {why}",
            reason=why, accelerator=self.driver,
            hint=("KVM does not run this guest here: set libvirt.driver=qemu (TCG), or auto to let the tool "
                  "fall back; then `invoke destroy` and run again" if self.driver == "kvm"
                  else f"see {self.log_dir / (self.domain + '.log')}; `invoke destroy` removes the VM"),
        )


# -- checks (doctor and preflight) ------------------------------------------------------------------


def virsh_check() -> Check:
    return tool_check("virsh", "virsh", APT + "libvirt-clients")


def libvirtd_check() -> Check:
    libvirtd = which("libvirtd")
    return Check("libvirtd", "ok" if libvirtd else "fail", libvirtd or "not installed",
                 "" if libvirtd else APT + "libvirt-daemon libvirt-daemon-driver-qemu dnsmasq-base")


def reachable_check(cfg: ApplianceConfig) -> Check:
    """Does libvirtd answer at ``libvirt.uri``?"""
    uri = cfg.libvirt.uri
    probe = run(["virsh", "-c", uri, "uri"], check=False, timeout=30)
    if probe.ok:
        return Check("libvirt", "ok", f"reachable at {uri}")
    why = " ".join(probe.tail("stderr", 2)) or "no answer"
    return Check("libvirt", "fail", f"not reachable at {uri}: {why}", libvirtd.start_hint(uri))


def kvm_user_check(cfg: ApplianceConfig) -> Check:
    """Can the user libvirt runs QEMU as open /dev/kvm? (Root probing KVM proves nothing about that user.)"""
    access = libvirtd.kvm_access(libvirtd.qemu_user())
    name = f"/dev/kvm for libvirt's QEMU user ({access.user})"
    if access.allowed:
        return Check(name, "ok", access.detail)
    if cfg.libvirt.driver == "qemu":
        return Check(name, "ok", f"not needed (libvirt.driver qemu): {access.detail}")
    verdict = "fail" if cfg.libvirt.driver == "kvm" else "warn"
    return Check(name, verdict, f"cannot open it, so libvirt's guests run under TCG emulation: {access.detail}",
                 access.fix)


def plugin_check() -> Check:
    """Is the vagrant-libvirt plugin installed (``vagrant plugin list``)?"""
    try:
        installed = plugins()
    except (PrerequisiteMissing, VagrantError) as exc:
        return Check(f"{PLUGIN} plugin", "fail", f"cannot list Vagrant's plugins: {exc.message.splitlines()[0]}",
                     exc.hint or "")
    if PLUGIN in installed:
        return Check(f"{PLUGIN} plugin", "ok", f"{PLUGIN} {installed[PLUGIN]}".strip())
    return Check(f"{PLUGIN} plugin", "fail", "missing", APT + f"{PLUGIN} (or `vagrant plugin install {PLUGIN}`)")


def acceleration_check(cfg: ApplianceConfig) -> Check:
    if cfg.libvirt.driver == "qemu":
        return Check("acceleration", "ok", "driver qemu (TCG emulation) chosen in config")
    driver, why = hostprobe.detect_libvirt_driver(uri=cfg.libvirt.uri, machine_type=cfg.libvirt.machine_type)
    if driver == "kvm":
        return Check("acceleration", "ok", f"KVM works ({why})")
    verdict = "fail" if cfg.libvirt.driver == "kvm" else "warn"
    return Check("acceleration", verdict, f"KVM unusable, TCG emulation (slow) will be used: {why}",
                 "enable virtualization in firmware / nested virtualization, or set libvirt.driver=qemu")


def check_libvirt(cfg: ApplianceConfig) -> list[Check]:
    """Every libvirt check ``invoke doctor`` shows (the preflight runs the ones ``up`` cannot do without)."""
    checks = [
        tool_check("qemu-system-x86_64", "qemu-system-x86_64", APT + "qemu-system-x86"),
        tool_check("qemu-img", "qemu-img", APT + "qemu-utils"),
        virsh_check(),
        libvirtd_check(),
    ]
    if checks[2].verdict == "ok":
        checks.append(reachable_check(cfg))
    checks.append(kvm_user_check(cfg))
    if which("vagrant"):
        checks.append(plugin_check())
    checks.append(acceleration_check(cfg))
    return checks


# -- explicit set-up ------------------------------------------------------------------------------


def ensure_storage_pool(cfg: ApplianceConfig) -> None:
    """The storage pool exists and runs: ``default`` is made in /var/lib/libvirt/images if missing,
    any other missing pool is an error naming the commands that make it."""
    uri, pool = cfg.libvirt.uri, cfg.libvirt.storage_pool
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
    run(["virsh", "-c", uri, "pool-define-as", pool, "dir", "--target", DEFAULT_POOL_DIR])
    run(["virsh", "-c", uri, "pool-build", pool])
    run(["virsh", "-c", uri, "pool-start", pool])
    run(["virsh", "-c", uri, "pool-autostart", pool], check=False)
    log.info(f"changed: created libvirt storage pool {pool} in {DEFAULT_POOL_DIR}")


# -- what Vagrant's output means here ---------------------------------------------------------------

# vagrant-libvirt's phases (appliance.vagrant.PHASES) that a timeout leaves it in, and where to look.
_PHASE_ADVICE = {
    "creating domain": "libvirt did not finish creating the domain (check `virsh list --all`)",
    "waiting for IP": "the guest got no DHCP lease on the management network (is dnsmasq installed?)",
    "waiting for SSH": "the guest has an address but SSH does not answer (watch it: `virsh console DOMAIN`)",
}


def failure_hint(output: str, phase: str | None, timed_out: bool) -> str | None:
    """What a failed Vagrant command's output means under vagrant-libvirt (None: nothing known)."""
    if "Error while connecting to Libvirt" in output or "Failed to connect socket" in output:
        return libvirtd.start_hint()
    if "provider 'libvirt' could not be found" in output:
        return f"install the plugin: `apt-get install -y --no-install-recommends {PLUGIN}`"
    if "already taken" in output:
        return "a libvirt domain with this name exists outside this project: `virsh undefine NAME` or set vm.name"
    if (timed_out or "Timed out while waiting for the machine to boot" in output) and phase in _PHASE_ADVICE:
        return f"{_PHASE_ADVICE[phase]}; raise vm.boot_timeout, or `invoke destroy` and retry"
    return None


_QEMU_ERROR = re.compile(r"(KVM internal error.*|Could not access KVM kernel module.*|qemu-system-\S+: .*)")


def qemu_start_failure(message: str) -> str:
    """QEMU's own lines inside a failed ``vagrant up`` (vagrant-libvirt wraps them in a Ruby error), or ""."""
    found = []
    for line in message.splitlines():
        m = _QEMU_ERROR.search(line)
        if m:
            found.append(re.sub(r"\s*\(Libvirt::Error\)\s*$", "", m.group(1)).strip())
    return "; ".join(dict.fromkeys(found))


# vagrant-libvirt's words for virsh's domain states: it reports fog-libvirt's state names with "-"
# as "_" (shutoff, shutting_down, ...), where virsh prints "shut off", "in shutdown".
_VAGRANT_STATE = {"shut off": "shutoff", "in shutdown": "shutting_down", "no state": "nostate"}


def domain_missing(virsh_stderr: str) -> bool:
    """virsh failed only because no such domain is defined: every error line is virsh's
    "failed to get domain 'x'" (tools/virsh-util.c, libvirt 9.0) or libvirt's VIR_ERR_NO_DOMAIN
    "Domain not found: ..." (src/util/virerror.c); a connection error adds lines of its own."""
    errors = [line for line in virsh_stderr.splitlines() if line.strip()]
    return bool(errors) and all(
        re.match(r"error: (failed to get domain '|Domain not found\b)", line.strip()) for line in errors)


class LibvirtProvider(Provider):
    name = "libvirt"
    boot_backend = "qemu"

    def host_checks(self) -> list[Check]:
        return check_libvirt(self.cfg)

    def resolve_driver(self) -> str | None:
        return hostprobe.resolve_libvirt_driver(self.cfg.libvirt.driver, uri=self.cfg.libvirt.uri,
                                      machine_type=self.cfg.libvirt.machine_type)

    def vagrant_env(self) -> dict[str, str]:
        return {"LIBVIRT_DEFAULT_URI": self.cfg.libvirt.uri}

    def guest_watch(self, driver: str | None) -> DomainWatch:
        return DomainWatch(self.cfg, driver or self.cfg.libvirt.driver)

    def can_fall_back(self, driver: str | None) -> bool:
        return self.cfg.libvirt.driver == "auto" and driver == "kvm"

    def fall_back(self, reason: str) -> LibvirtProvider:
        hostprobe.record_kvm_failure(reason)  # the probe's cached answer is TCG from now on
        return LibvirtProvider(self.cfg.model_copy(
            update={"libvirt": self.cfg.libvirt.model_copy(update={"driver": "qemu"})}))

    def vagrantfile_inputs(self, driver: str | None) -> dict[str, str]:
        inputs = super().vagrantfile_inputs(driver)
        if inputs["libvirt_driver"] not in ("kvm", "qemu"):
            # Guessing `kvm` hangs guests on hosts whose /dev/kvm does not accelerate (hostprobe).
            raise UsageError(f"cannot render libvirt driver {inputs['libvirt_driver']!r}: resolve 'auto' first "
                             "(appliance.vm.render does)")
        return inputs

    def check_reachable(self) -> None:
        require([virsh_check, lambda: reachable_check(self.cfg)])

    def start_services(self) -> None:
        libvirtd.ensure_running(self.cfg.libvirt.uri)  # root without systemd: starts libvirtd itself, and says so

    def preflight(self) -> None:
        require([virsh_check])
        libvirtd.ensure_running(self.cfg.libvirt.uri)  # root without systemd: starts libvirtd itself, and says so
        require([lambda: reachable_check(self.cfg), plugin_check])
        ensure_storage_pool(self.cfg)

    def before_create(self) -> None:
        domain = domain_name(self.cfg)
        found = run(["virsh", "-c", self.cfg.libvirt.uri, "domstate", domain], check=False, timeout=30)
        if found.ok:
            raise VagrantError(
                f"a libvirt domain named {domain!r} already exists ({found.stdout.strip()}) but is not this "
                f"project's VM ({project_dir(self.cfg)})",
                hint=f"remove it (virsh destroy {domain}; virsh undefine {domain} --remove-all-storage) "
                "or set vm.name",
            )

    def failure_hint(self, output: str, phase: str | None, timed_out: bool) -> str | None:
        return failure_hint(output, phase, timed_out)

    def start_failure(self, message: str, driver: str | None) -> str:
        # QEMU died as libvirt started it under KVM (vagrant-libvirt shows it inside a Ruby error).
        return qemu_start_failure(message) if driver == "kvm" else ""

    def rendered_driver(self, vagrantfile: Path) -> str | None:
        try:
            text = vagrantfile.read_text()
        except OSError:
            return None
        found = re.search(r"^\s*lv\.driver = ['\"](\w+)['\"]", text, re.M)
        return found.group(1) if found else None

    def machine_state(self, machine_id: str) -> str:
        probe = run(["virsh", "-c", self.cfg.libvirt.uri, "domstate", machine_id], check=False, timeout=30)
        if not probe.ok:
            if domain_missing(probe.stderr):
                return "not_created"
            # Any other failure (libvirtd restarting, a dropped connection, a timeout) says nothing of the
            # domain: taken as "gone", a destroy would skip the undefine yet forget Vagrant's record of it.
            detail = " ".join(probe.stderr.split()) or f"exit status {probe.returncode}"
            raise VagrantError(f"libvirt did not say whether the domain {machine_id} exists "
                               f"(virsh domstate: {detail}); nothing was changed",
                               hint=f"check that libvirt answers at {self.cfg.libvirt.uri} "
                                    "(`virsh list --all`), then run the command again")
        state, _ = parse_domstate(probe.stdout)
        return _VAGRANT_STATE.get(state, state.replace(" ", "_"))

    def remove_machine(self, machine_id: str, record: Path) -> None:
        uri = self.cfg.libvirt.uri
        if self.machine_state(machine_id) != "not_created":
            run(["virsh", "-c", uri, "destroy", machine_id], check=False, timeout=60)  # fails when it is off: fine
            run(["virsh", "-c", uri, "undefine", machine_id, "--remove-all-storage"], timeout=120)
        # As `vagrant destroy` does (vagrant-libvirt 0.11.2, action/destroy_networks.rb): the networks it
        # made for this machine (UUIDs in `created_networks`) go too, unless another domain still uses one.
        try:
            created = (record / "created_networks").read_text().split()
        except OSError:
            created = []
        for network in created:
            xml = run(["virsh", "-c", uri, "net-dumpxml", network], check=False, timeout=30)
            if not xml.ok or re.search(r"<network[^>]*\sconnections=", xml.stdout):
                continue  # gone already, or still in use
            run(["virsh", "-c", uri, "net-destroy", network], check=False, timeout=60)  # fails when inactive
            run(["virsh", "-c", uri, "net-undefine", network], timeout=60)

    def after_halt(self, project: Path) -> None:
        # vagrant-libvirt's `ssh -L` forwards outlive a VM that powered itself off (the seal).
        forwards.clear(self.cfg, project)

    def disk(self) -> Path:
        """The file behind the domain's only hard disk."""
        return find_domain_disk(self.cfg.libvirt.uri, domain_name(self.cfg))

    def export(self, dest_dir: Path) -> Exported:
        disk = self.disk()
        return Exported(export_libvirt(self.cfg, disk, dest_dir), disk)

    def package_box(self, raw_disk: Path, box_file: Path, *, key: Path, info: dict[str, object]) -> None:
        package_libvirt_box(raw_disk, box_file, key=key, info=info)
