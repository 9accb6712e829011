"""Which provider runs here: ``auto`` resolved on this host (``resolve_provider``), the provider of a
resolved configuration (``provider_for``), and the boot backend of ``verify-ova``."""

from __future__ import annotations

import shutil
from typing import Literal

from appliance.config import ApplianceConfig, provider_formats_problem
from appliance.errors import ConfigError, ConfigProblem, UsageError
from appliance.providers.base import Provider
from appliance.providers.libvirt.provider import LibvirtProvider
from appliance.providers.virtualbox.provider import VirtualBoxProvider

PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in (LibvirtProvider, VirtualBoxProvider)}


def provider_for(cfg: ApplianceConfig) -> Provider:
    """The provider of a resolved configuration (``auto`` must be resolved first: ``resolve_provider``)."""
    kind = PROVIDERS.get(cfg.provider)
    if kind is None:
        raise UsageError(
            f"provider {cfg.provider!r} is not resolved: resolve 'auto' first ({' or '.join(sorted(PROVIDERS))})"
        )
    return kind(cfg)


def boot_backend_for(cfg: ApplianceConfig) -> str:
    """How ``verify-ova`` boots a copy for this configuration; an unresolved ``auto`` boots under QEMU,
    which needs no hypervisor beyond QEMU itself (``verify-ova`` does not probe for VirtualBox)."""
    kind = PROVIDERS.get(cfg.provider, LibvirtProvider)
    return kind.boot_backend


def detect_provider() -> tuple[Literal["virtualbox", "libvirt"], str]:
    """``auto``: VirtualBox where VBoxManage is installed, else libvirt. Returns the choice and why."""
    found = shutil.which("VBoxManage") or shutil.which("vboxmanage")
    if found:
        return "virtualbox", f"VBoxManage found at {found}"
    return "libvirt", "VBoxManage not found on PATH"


def resolve_provider(cfg: ApplianceConfig) -> tuple[ApplianceConfig, str | None]:
    """Replace ``provider: auto`` by the detected provider. Returns the config and the reason (or None).

    Raises ``ConfigError`` when the detected provider cannot build ``output.formats`` (the rule
    ``load_config`` checks for an explicit provider): at once, not at the export hours later."""
    if cfg.provider != "auto":
        return cfg, None
    chosen, why = detect_provider()
    if problem := provider_formats_problem(chosen, cfg.output.formats):
        raise ConfigError([ConfigProblem(f"provider auto -> {chosen} ({why})", "output.formats", problem,
                                         cfg.output.formats, has_value=True)])
    return cfg.model_copy(update={"provider": chosen}), f"provider auto -> {chosen} ({why})"
