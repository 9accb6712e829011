"""``invoke doctor``: is this host able to build with the chosen provider?

Each check is a probe with a verdict (ok / warn / fail), what it found, and, when it
fails, the command that fixes it. The build cannot run if any check fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from rich.table import Table

from appliance.checks import Check, tool_check, version_tuple
from appliance.config import BUILT_BOX, ApplianceConfig
from appliance.errors import PrerequisiteMissing
from appliance.log import log
from appliance.providers.registry import provider_for
from appliance.run import run, which
from appliance.vagrant import MIN_VAGRANT

# Rough working space a build needs on the host besides the VM disk's real use: the box,
# the exported VMDK and the OVA (the stack adds its images and artifacts).
WORKSPACE_GB_BASE = 6
WORKSPACE_GB_STACK = 40


def check_vagrant() -> list[Check]:
    path = which("vagrant")
    if path is None:
        return [Check("vagrant", "fail", "not found", "apt-get install --no-install-recommends vagrant "
                      "(or HashiCorp's package: https://developer.hashicorp.com/vagrant/install)")]
    res = run([path, "--version"], check=False, timeout=120)
    ver = version_tuple(res.stdout)
    if not ver or ver < MIN_VAGRANT:
        return [Check("vagrant", "fail", res.stdout.strip() or res.stderr.strip(),
                      f"Vagrant >= {'.'.join(map(str, MIN_VAGRANT))} is needed")]
    return [Check("vagrant", "ok", res.stdout.strip())]


def check_base_box_tools(cfg: ApplianceConfig) -> list[Check]:
    if cfg.vm.box != BUILT_BOX:
        return []  # a public box (e.g. for macOS/Windows hosts) needs no local build tools
    apt = "apt-get install --no-install-recommends "
    return [
        tool_check("mmdebstrap (for invoke base-box)", "mmdebstrap", apt + "mmdebstrap"),
        Check("extlinux (for invoke base-box)", "ok" if which("extlinux") else "fail",
              which("extlinux") or "not found", "" if which("extlinux") else apt + "extlinux syslinux-common"),
    ]


def _available_memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def check_resources(cfg: ApplianceConfig) -> list[Check]:
    checks = []
    avail = _available_memory_mb()
    if avail is not None:
        ok = avail >= cfg.vm.memory_mb + 512
        checks.append(Check("memory", "ok" if ok else "fail", f"{avail} MiB available, VM needs {cfg.vm.memory_mb} MiB",
                            "" if ok else "free memory or lower vm.memory_mb"))
    need = WORKSPACE_GB_STACK if cfg.stack_enabled else WORKSPACE_GB_BASE
    probe = cfg.build_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    ok = free_gb >= need
    found = f"{free_gb:.0f} GB free at {probe}, build needs ~{need} GB"
    checks.append(Check("disk space", "ok" if ok else "fail", found,
                        "" if ok else "free space or point output.build_dir elsewhere"))
    cpus = os.cpu_count() or 1
    checks.append(Check("host CPUs", "ok" if cpus >= cfg.vm.cpus else "warn", f"{cpus} host CPUs, VM has {cfg.vm.cpus}",
                        "" if cpus >= cfg.vm.cpus else "more vCPUs than host CPUs slows the guest; lower vm.cpus"))
    return checks


def check_image_cache(cfg: ApplianceConfig) -> list[Check]:
    """What the image cache holds of the set the build needs (the guest never pulls)."""
    from appliance.guest import NEED_IMAGE_SET
    from appliance.scripts import declared_needs

    if NEED_IMAGE_SET not in declared_needs(cfg.provision.skip):
        return []
    from appliance.imagecache import ImageFetchError, declared_pins, missing_images

    try:
        pinned = declared_pins(cfg)
    except ImageFetchError:
        return [Check("image cache", "warn", "image set not computed yet", "invoke fetch")]
    lacking = missing_images(cfg, pinned)
    unpinned = sum(1 for _, digest in pinned if not digest)
    if not lacking:
        return [Check("image cache", "ok", f"all {len(pinned)} images of the set cached by digest")]
    found = f"{len(pinned) - len(lacking)} of {len(pinned)} cached; missing: {', '.join(lacking[:3])}" + (
        f" (+{len(lacking) - 3} more)" if len(lacking) > 3 else "")
    fix = "invoke lock --images, then invoke fetch" if unpinned else "invoke fetch (or --from-bundle FILE)"
    return [Check("image cache", "warn", found, fix)]


def collect_checks(cfg: ApplianceConfig) -> list[Check]:
    """Every check for ``cfg.provider`` (already resolved from ``auto``): the provider's own among them."""
    provider = provider_for(cfg)
    probes: list[Callable[[], list[Check]]] = [
        check_vagrant, provider.host_checks, lambda: check_base_box_tools(cfg), lambda: check_resources(cfg),
        lambda: check_image_cache(cfg),
    ]
    return [c for probe in probes for c in probe()]


def run_doctor(cfg: ApplianceConfig) -> list[Check]:
    """Print the checks as a table; raise ``PrerequisiteMissing`` if the build cannot run."""
    checks = collect_checks(cfg)
    table = Table(title=f"csghub-appliance doctor (provider {cfg.provider})")
    for col in ("check", "", "found", "fix"):
        table.add_column(col)
    style = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for c in checks:
        table.add_row(c.name, style[c.verdict], c.found, c.fix)
    log.console.print(table)
    failed = [c for c in checks if c.verdict == "fail"]
    if failed:
        raise PrerequisiteMissing(
            f"{len(failed)} check(s) failed: " + ", ".join(c.name for c in failed),
            hint="run the commands in the fix column, then `invoke doctor` again",
        )
    log.success("this host can build the appliance")
    return checks
