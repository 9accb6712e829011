"""libvirt/QEMU through vagrant-libvirt: the Linux build host's and CI's provider, and our tests'.

Host checks (shared by ``invoke doctor`` and the preflight before ``vagrant up``): QEMU,
qemu-img, virsh, libvirtd, libvirt answering at ``libvirt.uri``, the vagrant-libvirt plugin,
and whether KVM really accelerates (``appliance.hostprobe``). The storage pool is not a check:
the preflight makes sure it exists and runs (``ensure_storage_pool``, an explicit action that
says what it changed). The disk is the domain's only hard disk; the OVA is written by our own
writer (``appliance.export.libvirt``). The verify stage boots a copy under QEMU.
"""

from __future__ import annotations

import re
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.doctor import Check, tool_check
from appliance.errors import PrerequisiteMissing, UsageError, VagrantError
from appliance.log import log
from appliance.providers.base import Exported, Provider, require
from appliance.run import run, which

APT = "apt-get install --no-install-recommends "
START_LIBVIRT = ("start it: `systemctl start libvirtd` (without systemd: `virtlogd -d && libvirtd -d`; "
                 "docs/vm-lifecycle.md lists what libvirtd needs on a host without libvirt-daemon-system)")
PLUGIN = "vagrant-libvirt"
DEFAULT_POOL_DIR = "/var/lib/libvirt/images"


def domain_name(cfg: ApplianceConfig) -> str:
    """The libvirt domain of the build VM: Vagrantfile.j2 sets the prefix ``<vm.name>_``, the machine is ``default``."""
    from appliance.vagrant import MACHINE

    return f"{cfg.vm.name}_{MACHINE}"


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
    return Check("libvirt", "fail", f"not reachable at {uri}: {why}", START_LIBVIRT)


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
    from appliance.hostprobe import detect_libvirt_driver

    driver, why = detect_libvirt_driver()
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
        from appliance.hostprobe import resolve_libvirt_driver

        return resolve_libvirt_driver(self.cfg.libvirt.driver)

    def vagrant_env(self) -> dict[str, str]:
        return {"LIBVIRT_DEFAULT_URI": self.cfg.libvirt.uri}

    def vagrantfile_inputs(self, driver: str | None) -> dict[str, str]:
        inputs = super().vagrantfile_inputs(driver)
        if inputs["libvirt_driver"] not in ("kvm", "qemu"):
            # Guessing `kvm` hangs guests on hosts whose /dev/kvm does not accelerate (hostprobe).
            raise UsageError(f"cannot render libvirt driver {inputs['libvirt_driver']!r}: resolve 'auto' first "
                             "(appliance.vagrant.render does)")
        return inputs

    def check_reachable(self) -> None:
        require([virsh_check, lambda: reachable_check(self.cfg)])

    def preflight(self) -> None:
        require([virsh_check, lambda: reachable_check(self.cfg), plugin_check])
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
        from appliance import forwards

        forwards.clear(self.cfg, project)

    def disk(self) -> Path:
        """The file behind the domain's only hard disk."""
        from appliance.export.libvirt import find_domain_disk

        return find_domain_disk(self.cfg.libvirt.uri, domain_name(self.cfg))

    def export(self, dest_dir: Path) -> Exported:
        from appliance.export.libvirt import export_libvirt

        disk = self.disk()
        return Exported(export_libvirt(self.cfg, disk, dest_dir), disk)

    def package_box(self, raw_disk: Path, box_file: Path, *, key: Path, info: dict[str, object]) -> None:
        from appliance.basebox import package_libvirt_box

        package_libvirt_box(raw_disk, box_file, key=key, info=info)
