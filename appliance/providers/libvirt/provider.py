"""libvirt/QEMU through vagrant-libvirt: the Linux build host's and CI's provider, and our tests'.

Host checks (shared by ``invoke doctor`` and the preflight before ``vagrant up``): QEMU,
qemu-img, virsh, libvirtd, libvirt answering at ``libvirt.uri``, the vagrant-libvirt plugin,
and whether KVM really accelerates (``appliance.providers.libvirt.hostprobe``). The storage pool is not a check:
the preflight makes sure it exists and runs (``ensure_storage_pool``, an explicit action that
says what it changed). The disk is the domain's only hard disk; the OVA is written by our own
writer (``appliance.providers.libvirt.export``). The verify stage boots a copy under QEMU.
"""

from __future__ import annotations

import re
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.doctor import Check, tool_check
from appliance.errors import GuestStopped, PrerequisiteMissing, UsageError, VagrantError
from appliance.log import log
from appliance.providers.base import Exported, Provider, require
from appliance.providers.libvirt.libvirtd import QEMU_LOG_DIR
from appliance.run import run, which

APT = "apt-get install --no-install-recommends "
PLUGIN = "vagrant-libvirt"
DEFAULT_POOL_DIR = "/var/lib/libvirt/images"


def domain_name(cfg: ApplianceConfig) -> str:
    """The libvirt domain of the build VM: Vagrantfile.j2 sets the prefix ``<vm.name>_``, the machine is ``default``."""
    from appliance.vagrant import MACHINE

    return f"{cfg.vm.name}_{MACHINE}"


# -- watching a booting domain --------------------------------------------------------------------

# `virsh domstate --reason` states in which a domain is still on its way up (libvirt 9:
# tools/virsh-domain-monitor.c); a domain is "shut off" before Vagrant starts it.
_STARTING = {("paused", "starting up"), ("paused", "booting"), ("paused", "migration"), ("paused", "snapshot")}


def parse_domstate(text: str) -> tuple[str, str]:
    """``("paused", "crashed")`` from ``virsh domstate --reason`` output ``paused (crashed)``."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    m = re.fullmatch(r"(.+?)\s*\((.*)\)", line)
    return (m.group(1).strip(), m.group(2).strip()) if m else (line, "")


def domain_log_reason(domain: str, log_dir: Path = QEMU_LOG_DIR) -> str:
    """Why the domain's QEMU stopped, from libvirt's log of its latest start (``<log_dir>/<domain>.log``)."""
    from appliance.providers.libvirt.hostprobe import domain_failure_lines

    lines = domain_failure_lines(domain, log_dir)
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
        if (state, reason) in _STARTING or (state == "shut off" and not self.seen_running):
            return None
        if state not in ("paused", "shut off", "crashed", "pmsuspended"):
            return None  # running, or "blocked" (waiting on I/O): alive
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
    from appliance.providers.libvirt.libvirtd import start_hint

    return Check("libvirt", "fail", f"not reachable at {uri}: {why}", start_hint(uri))


def kvm_user_check(cfg: ApplianceConfig) -> Check:
    """Can the user libvirt runs QEMU as open /dev/kvm? (Root probing KVM proves nothing about that user.)"""
    from appliance.providers.libvirt.libvirtd import kvm_access, qemu_user

    access = kvm_access(qemu_user())
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
    from appliance.vagrant import plugins

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
    from appliance.providers.libvirt.hostprobe import detect_libvirt_driver

    driver, why = detect_libvirt_driver(uri=cfg.libvirt.uri, machine_type=cfg.libvirt.machine_type)
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


class LibvirtProvider(Provider):
    name = "libvirt"
    boot_backend = "qemu"

    def host_checks(self) -> list[Check]:
        return check_libvirt(self.cfg)

    def resolve_driver(self) -> str | None:
        from appliance.providers.libvirt.hostprobe import resolve_libvirt_driver

        return resolve_libvirt_driver(self.cfg.libvirt.driver, uri=self.cfg.libvirt.uri,
                                      machine_type=self.cfg.libvirt.machine_type)

    def vagrant_env(self) -> dict[str, str]:
        return {"LIBVIRT_DEFAULT_URI": self.cfg.libvirt.uri}

    def guest_watch(self, driver: str | None) -> DomainWatch:
        return DomainWatch(self.cfg, driver or self.cfg.libvirt.driver)

    def can_fall_back(self, driver: str | None) -> bool:
        return self.cfg.libvirt.driver == "auto" and driver == "kvm"

    def vagrantfile_inputs(self, driver: str | None) -> dict[str, str]:
        inputs = super().vagrantfile_inputs(driver)
        if inputs["libvirt_driver"] not in ("kvm", "qemu"):
            # Guessing `kvm` hangs guests on hosts whose /dev/kvm does not accelerate (hostprobe).
            raise UsageError(f"cannot render libvirt driver {inputs['libvirt_driver']!r}: resolve 'auto' first "
                             "(appliance.vagrant.render does)")
        return inputs

    def check_reachable(self) -> None:
        require([virsh_check, lambda: reachable_check(self.cfg)])

    def start_services(self) -> None:
        from appliance.providers.libvirt.libvirtd import ensure_running

        ensure_running(self.cfg.libvirt.uri)  # root without systemd: starts libvirtd itself, and says so

    def preflight(self) -> None:
        from appliance.providers.libvirt.libvirtd import ensure_running

        require([virsh_check])
        ensure_running(self.cfg.libvirt.uri)  # root without systemd: starts libvirtd itself, and says so
        require([lambda: reachable_check(self.cfg), plugin_check])
        ensure_storage_pool(self.cfg)

    def before_create(self) -> None:
        domain = domain_name(self.cfg)
        found = run(["virsh", "-c", self.cfg.libvirt.uri, "domstate", domain], check=False, timeout=30)
        if found.ok:
            from appliance.vagrant import project_dir

            raise VagrantError(
                f"a libvirt domain named {domain!r} already exists ({found.stdout.strip()}) but is not this "
                f"project's VM ({project_dir(self.cfg)})",
                hint=f"remove it (virsh destroy {domain}; virsh undefine {domain} --remove-all-storage) "
                "or set vm.name",
            )

    def after_halt(self, project: Path) -> None:
        # vagrant-libvirt's `ssh -L` forwards outlive a VM that powered itself off (the seal).
        from appliance.providers.libvirt import forwards

        forwards.clear(self.cfg, project)

    def disk(self) -> Path:
        """The file behind the domain's only hard disk."""
        from appliance.providers.libvirt.export import find_domain_disk

        return find_domain_disk(self.cfg.libvirt.uri, domain_name(self.cfg))

    def export(self, dest_dir: Path) -> Exported:
        from appliance.providers.libvirt.export import export_libvirt

        disk = self.disk()
        return Exported(export_libvirt(self.cfg, disk, dest_dir), disk)

    def package_box(self, raw_disk: Path, box_file: Path, *, key: Path, info: dict[str, object]) -> None:
        from appliance.basebox import package_libvirt_box

        package_libvirt_box(raw_disk, box_file, key=key, info=info)
