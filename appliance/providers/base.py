"""The provider seam: what differs between VirtualBox and libvirt/QEMU, behind one interface.

A ``Provider`` is built once from the resolved configuration (``providers.registry.provider_for``)
and answers every provider question the rest of the tool has: the host checks ``invoke doctor``
shows, the libvirt driver (resolved on the host, never guessed), the Vagrant project facts
(environment, Vagrant's provider name, the Vagrantfile provider block's inputs), the preflight
before ``vagrant up``, the clean-up after the VM stops, where the disk is and how it becomes an
OVA, how the box is packaged, and which backend boots a copy in the verify stage. Vagrant itself
is driven the same way for both (``appliance.vm`` through ``appliance.vagrant``); only these
facts differ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from appliance.errors import GuestStopped

if TYPE_CHECKING:  # pragma: no cover
    from appliance.checks import Check
    from appliance.config import ApplianceConfig
    from appliance.export.ova import OvaResult


@dataclass(frozen=True)
class Exported:
    """What the export wrote: the OVA, and the VM disk it was made from when the provider knows it."""

    ova: OvaResult
    disk: Path | None = None


class Provider(ABC):
    """One Vagrant provider's facts and actions, for one resolved configuration."""

    name: ClassVar[str]  # Vagrant's provider name; also the provider of the base box
    boot_backend: ClassVar[str]  # how the verify stage boots a fresh copy: "qemu" or "virtualbox"

    def __init__(self, cfg: ApplianceConfig) -> None:
        self.cfg = cfg

    # -- host --------------------------------------------------------------------------------

    @abstractmethod
    def host_checks(self) -> list[Check]:
        """The checks ``invoke doctor`` shows for this provider (probes only: nothing is changed)."""

    @abstractmethod
    def resolve_driver(self) -> str | None:
        """The hypervisor driver the Vagrantfile names (libvirt: ``kvm`` or ``qemu``); ``None`` when there is none."""

    # -- the Vagrant project -----------------------------------------------------------------

    def vagrant_env(self) -> dict[str, str]:
        """Environment variables every Vagrant command of this project gets, beyond the common ones."""
        return {}

    def vagrantfile_inputs(self, driver: str | None) -> dict[str, str]:
        """The values ``Vagrantfile.j2`` reads for the provider block (rendered by ``appliance.vm.render``)."""
        chosen = driver or self.cfg.libvirt.driver
        cpu_mode = self.cfg.libvirt.cpu_mode
        if cpu_mode == "auto":
            cpu_mode = "host-passthrough" if chosen == "kvm" else "custom"
        return {"provider": self.name, "libvirt_driver": chosen, "cpu_mode": cpu_mode}

    def check_reachable(self) -> None:
        """Before asking Vagrant about the VM: raise ``PrerequisiteMissing`` if the hypervisor does not answer."""
        return None  # nothing to do unless a provider says otherwise

    def start_services(self) -> None:
        """Before the build renders (its driver probe may boot through the hypervisor): start what the provider
        may start on this host. Never from a plain ``invoke render``."""
        return None  # nothing to do unless a provider says otherwise

    def preflight(self) -> None:
        """Before ``vagrant up``: the checks that must pass, then the explicit set-up the provider needs."""
        return None  # nothing to do unless a provider says otherwise

    def before_create(self) -> None:
        """Before ``vagrant up`` creates a new VM: refuse what would collide with it."""
        return None  # nothing to do unless a provider says otherwise

    def guest_watch(self, driver: str | None) -> Callable[[], GuestStopped | None] | None:
        """While ``vagrant up`` runs: a check that says when the booting VM stopped running (``None``: none)."""
        return None

    def can_fall_back(self, driver: str | None) -> bool:
        """Whether a VM that stopped under ``driver`` is booted once more without hardware acceleration."""
        return False

    def fall_back(self, reason: str) -> Provider:
        """After ``can_fall_back``: remember that acceleration failed (``reason``) and return the provider for
        the configuration that boots without it."""
        return self

    def failure_hint(self, output: str, phase: str | None, timed_out: bool) -> str | None:
        """What a failed Vagrant command's output (stderr and stdout) means for this provider, or None."""
        return None

    def start_failure(self, message: str, driver: str | None) -> str:
        """The hypervisor's own reason inside a failed ``vagrant up`` that a retry without acceleration
        may cure ("": none)."""
        return ""

    def rendered_driver(self, vagrantfile: Path) -> str | None:
        """The hypervisor driver a rendered Vagrantfile names (``None``: none, or no such file)."""
        return None

    @abstractmethod
    def machine_state(self, machine_id: str) -> str:
        """The state of the VM Vagrant recorded under ``machine_id``, asked of the hypervisor itself, in
        Vagrant's words (``not_created`` when it is gone): for a project whose Vagrantfile is missing."""

    @abstractmethod
    def remove_machine(self, machine_id: str, record: Path) -> None:
        """Stop and remove the VM Vagrant recorded under ``machine_id`` and its disks, without Vagrant
        (whose commands need the Vagrantfile): ``invoke destroy`` of a project whose Vagrantfile is missing.
        ``record`` is Vagrant's folder for the machine (``.vagrant/machines/<name>/<provider>``)."""

    def after_halt(self, project: Path) -> None:
        """After the VM stopped (halted by Vagrant or powered off by itself): release what outlived it."""
        return None  # nothing to do unless a provider says otherwise

    # -- disk and export ----------------------------------------------------------------------

    @abstractmethod
    def export(self, dest_dir: Path) -> Exported:
        """Write ``dest_dir/<name>-<version>.ova`` (and its ``.sha256``) from the halted VM."""

    # -- base box -----------------------------------------------------------------------------

    def box_digest(self, image_digest: str) -> str:
        """The base box's cache key from the image's: plus whatever this provider's packaging takes from the config."""
        return image_digest

    @abstractmethod
    def package_box(self, raw_disk: Path, box_file: Path, *, key: Path, info: dict[str, object]) -> None:
        """Package the base box's raw disk as a Vagrant box for this provider."""
