"""Base-box stage: a minimal Debian box built from the Debian archive, added to Vagrant.

``build_base_box(cfg, provider)`` makes a bootable raw disk (``appliance.image``), has the
provider package it (``Provider.package_box``: ``providers/libvirt/box.py`` writes the
vagrant-libvirt format, box.img qcow2; ``providers/virtualbox/box.py`` Vagrant's VirtualBox
format, box.ovf + streamOptimized VMDK with the disk already sized ``vm.disk_gb``) and adds it
to Vagrant as ``cfg.vm.box``; the guest grows its root filesystem to the disk on boot. It is cached: the box
file is kept under ``$XDG_CACHE_HOME/csghub-appliance/basebox`` keyed by a hash of every
input (suite, mirrors, package list, the customize hook and the files it installs, the
build's SSH key, disk size, this module's format version); a second call with nothing
changed checks ``vagrant box list`` and does nothing else.

The box carries an SSH key made for this build (ed25519, kept in the cache directory and
inside the box), never Vagrant's world-known insecure key. Its embedded Vagrantfile points
Vagrant at that key, so a plain ``vagrant up`` logs in with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import BUILT_BOX, ApplianceConfig
from appliance.digest import sha256_file
from appliance.errors import PrerequisiteMissing, VagrantError
from appliance.image import CUSTOMIZE_FILES, ImageSpec, build_raw_disk, remove_tree
from appliance.log import human_size, log
from appliance.run import run, which
from appliance.vagrant import Vagrant, box_list

if TYPE_CHECKING:  # pragma: no cover
    from appliance.providers.base import Provider

# Bump when the packaging below changes in a way the inputs do not show.
BOX_FORMAT_VERSION = 1
DEFAULT_SUITE = "bookworm"
# The archive this machine's own apt uses (see /etc/apt/sources.list.d); `--mirror` overrides it.
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# Small on purpose: the guest grows its root filesystem to the disk vagrant-libvirt gives it
# (vm.disk_gb) on boot.
BOX_DISK_GB = 4
BOX_HOSTNAME = "debian12"
KEY_NAME = "vagrant_ed25519"
# Beside a cached box: its kernel and initramfs, taken out for the KVM probe (providers/libvirt/box.py).
KERNEL_DIR_SUFFIX = ".kernel"
# Copying a box of a few hundred MB into ~/.vagrant.d (and, for libvirt, nothing more).
BOX_ADD_TIMEOUT = 1800



@dataclass(frozen=True)
class BaseBox:
    """The result of ``build_base_box``: where the box is, what it is, and what work was done."""

    name: str
    version: str
    provider: str
    box_file: Path
    private_key: Path
    size_bytes: int
    inputs_sha256: str
    built: bool
    added: bool


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/csghub-appliance/basebox`` (``~/.cache`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "csghub-appliance" / "basebox"


def _ensure_key(directory: Path) -> Path:
    """The build's SSH key pair, made once and reused (it is an input of the box)."""
    key = directory / KEY_NAME
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    if key.exists() and key.with_suffix(".pub").exists():
        key.chmod(0o600)  # caches made before this rule may hold it readable by others
        return key
    for stale in (key, key.with_suffix(".pub")):
        stale.unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "csghub-basebox", "-f", str(key)])
    key.chmod(0o600)
    log.info(f"changed: made the base box's SSH key {key}")
    return key


def inputs_digest(spec_identity: dict[str, object]) -> str:
    """The cache key: every input of the box, as sorted JSON, plus the bytes of the hook files."""
    manifest = {
        "format": BOX_FORMAT_VERSION,
        "image": spec_identity,
        "files": {p.name: sha256_file(p) for p in CUSTOMIZE_FILES},
    }
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def make_spec(
    *, user: str, authorized_key: str, suite: str, mirror: str, security_mirror: str
) -> tuple[ImageSpec, str]:
    """The image spec and its inputs digest. The root UUID is derived from the inputs, so it is stable."""
    draft = ImageSpec(
        suite=suite,
        mirror=mirror,
        security_mirror=security_mirror,
        user=user,
        authorized_key=authorized_key,
        hostname=BOX_HOSTNAME,
        root_uuid="",
        disk_bytes=BOX_DISK_GB * 1024**3,
    )
    root_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, "csghub-basebox:" + inputs_digest(draft.identity())))
    spec = ImageSpec(**{**draft.__dict__, "root_uuid": root_uuid})
    return spec, inputs_digest(spec.identity())


def box_version(built_at: datetime) -> str:
    """A Vagrant box version that grows with each build (12.YYYYMMDD.HHMMSS).

    Every build gets a new version so vagrant-libvirt never reuses a storage-pool volume
    uploaded from an older box with the same name.
    """
    return f"12.{built_at:%Y%m%d}.{int(built_at.strftime('%H%M%S'))}"


def write_box(box_file: Path, members: list[tuple[str, bytes | Path, int]]) -> None:
    """A box is a tar; written next to ``box_file`` and renamed into place (no half box on failure).

    The box holds the build's private key: it is written 0600 from the first byte, under a temporary name of its
    own (mkstemp: never a name someone else could have planted).
    """
    fd, partial_name = tempfile.mkstemp(dir=box_file.parent, prefix=f".{box_file.name}.", suffix=".partial")
    partial = Path(partial_name)
    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_members(tar, members)
        os.replace(partial, box_file)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _add_members(tar: tarfile.TarFile, members: list[tuple[str, bytes | Path, int]]) -> None:
    for name, content, mode in members:
        if isinstance(content, Path):
            ti = tar.gettarinfo(str(content), arcname=name)
            ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = mode, 0, 0, "root", "root"
            with content.open("rb") as f:
                tar.addfile(ti, f)
        else:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(content), mode, int(time.time())
            tar.addfile(ti, io.BytesIO(content))


def installed_versions(name: str, provider: str) -> list[str]:
    """Versions of box ``name`` for ``provider`` that Vagrant has, from ``vagrant box list``."""
    return [b.version for b in box_list() if (b.name, b.provider) == (name, provider)]


def prune_boxes(name: str, provider: str) -> None:
    """Remove older versions of the box unless a VM still uses one (a failure only warns: they are dead weight)."""
    try:
        Vagrant().run("box", "prune", "--name", name, "--provider", provider, "--force", "--keep-active-boxes",
                      show=True)
    except VagrantError as exc:
        log.warning(f"could not prune older versions of {name}: {exc.message.splitlines()[0]}")


def add_box(box_file: Path, *, name: str, version: str, workdir: Path, provider: str) -> None:
    """Add the box to Vagrant through a local catalog, so it carries ``version``."""
    catalog = workdir / "catalog.json"
    catalog.write_text(
        json.dumps(
            {
                "name": name,
                "description": "Minimal Debian 12 built by csghub-appliance (invoke base-box)",
                "versions": [
                    {
                        "version": version,
                        "providers": [
                            {
                                "name": provider,
                                "url": box_file.resolve().as_uri(),
                                "checksum_type": "sha256",
                                "checksum": sha256_file(box_file),
                            }
                        ],
                    }
                ],
            },
            indent=2,
        )
    )
    try:
        Vagrant().run("box", "add", "--force", "--provider", provider, str(catalog), show=True,
                      timeout=BOX_ADD_TIMEOUT)
    except VagrantError as exc:
        raise VagrantError(exc.message, hint=exc.hint or "is there room in ~/.vagrant.d (VAGRANT_HOME)?") from None


def _remove_stale_workdirs(root: Path) -> None:
    """Work trees left by builds that were killed (their process is gone)."""
    for stale in root.glob("work-*"):
        pid = stale.name.removeprefix("work-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            log.info(f"changed: removing {stale}, left by an interrupted build")
            remove_tree(stale)


def build_base_box(
    cfg: ApplianceConfig,
    provider: Provider,
    *,
    force: bool = False,
    mirror: str = DEFAULT_MIRROR,
    security_mirror: str = DEFAULT_SECURITY_MIRROR,
    suite: str = DEFAULT_SUITE,
    cache: Path | None = None,
) -> BaseBox:
    """Build (or reuse) the base box ``cfg.vm.box`` and make sure Vagrant has it.

    ``force`` rebuilds even when a box for the same inputs is cached.
    """
    if which("vagrant") is None:
        raise PrerequisiteMissing("vagrant is not installed", hint="apt-get install -y --no-install-recommends vagrant")
    if which("qemu-img") is None:
        raise PrerequisiteMissing(
            "qemu-img is not installed", hint="apt-get install -y --no-install-recommends qemu-utils"
        )
    root = cache or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    # One build at a time per cache: a second caller waits, then finds the box built.
    with (root / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _build_locked(cfg, root, provider, force=force, mirror=mirror, security_mirror=security_mirror,
                                 suite=suite)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class BoxCheck:
    """What ``ensure_base_box`` did: ``built`` (built or taken from the cache, and added) and why."""

    added: bool
    note: str


def ensure_base_box(cfg: ApplianceConfig, provider: Provider) -> BoxCheck:
    """The build's first need, from nothing: Vagrant has ``vm.box`` for the configured provider.

    Present: nothing is done. Missing and ours (``csghub/debian12``): ``build_base_box`` makes
    it exactly as ``invoke base-box`` does (from the cache when the same inputs were built
    before, else from the Debian archive). Missing and not ours: nothing is done here; ``up``
    says how to get it.
    """
    have = [b for b in box_list() if b.name == cfg.vm.box and (b.provider or provider.name) == provider.name]
    if have:
        return BoxCheck(False, f"Vagrant has {cfg.vm.box} {have[-1].version} ({provider.name})")
    if cfg.vm.box != BUILT_BOX:
        return BoxCheck(False, f"vm.box {cfg.vm.box} is not built by this tool: `vagrant box add` it")
    box = build_base_box(cfg, provider)
    how = "built from the Debian archive" if box.built else f"taken from the cache ({box.box_file})"
    return BoxCheck(True, f"{box.name} {box.version} ({box.provider}) {how} and added to Vagrant")


def _build_locked(
    cfg: ApplianceConfig, root: Path, provider: Provider, *, force: bool, mirror: str, security_mirror: str, suite: str
) -> BaseBox:
    name = cfg.vm.box
    with log.step("base box: check the cache"):
        key = _ensure_key(root / "keys")
        spec, digest = make_spec(
            user=cfg.ssh.user,
            authorized_key=key.with_suffix(".pub").read_text().strip(),
            suite=suite,
            mirror=mirror,
            security_mirror=security_mirror,
        )
        digest = provider.box_digest(digest)
        box_dir = root / provider.name
        box_file = box_dir / f"{digest[:16]}.box"
        info_file = box_dir / f"{digest[:16]}.json"
        cached = box_file.exists() and info_file.exists() and not force
        if cached:
            box_file.chmod(0o600)  # it holds the private key; older caches wrote it 0644
            info = json.loads(info_file.read_text())
            log.info(f"ok: {box_file} already built from these inputs ({digest[:16]})")
        else:
            log.info(f"building: no cached box for inputs {digest[:16]}" + (" (--force)" if force else ""))

    built = False
    if not cached:
        box_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_workdirs(root)
        workdir = root / f"work-{os.getpid()}"
        remove_tree(workdir)
        workdir.mkdir(parents=True)
        try:
            image = build_raw_disk(spec, workdir, apt_archives=root / "apt-archives")
            built_at = datetime.now(UTC)
            info = {
                "built_by": "csghub-appliance invoke base-box",
                "built_at": built_at.isoformat(timespec="seconds"),
                "version": box_version(built_at),
                "inputs_sha256": digest,
                "debian_suite": suite,
                "user": cfg.ssh.user,
            }
            info["provider"] = provider.name
            with log.step(f"package the {provider.name} box"):
                provider.package_box(image.raw_disk, box_file, key=key, info=info)
                info_file.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            for old in box_dir.iterdir():
                if old.suffix in (".box", ".json") and old.stem != box_file.stem:
                    old.unlink()
                elif old.suffix == KERNEL_DIR_SUFFIX and old.stem != box_file.stem:
                    remove_tree(old)  # the KVM probe's copy of an older box's kernel
            built = True
        finally:
            remove_tree(workdir)

    version = str(info["version"])
    kind = provider.name
    with log.step(f"add {name} {version} to Vagrant"):
        if version in installed_versions(name, kind):
            log.info(f"ok: Vagrant already has {name} {version} ({kind})")
            added = False
        else:
            add_box(box_file, name=name, version=version, workdir=box_dir, provider=kind)
            log.info(f"changed: added {name} {version} ({kind})")
            added = True
            # Older builds of the box are dead weight (~170 MB each) unless a VM still uses one.
            prune_boxes(name, kind)
    if added and version not in installed_versions(name, kind):
        raise VagrantError(f"box {name} {version} is not listed by `vagrant box list` after adding it")
    size = box_file.stat().st_size
    log.success(f"base box {name} {version}: {box_file} ({human_size(size)})")
    return BaseBox(
        name=name, version=version, provider=kind, box_file=box_file, private_key=key,
        size_bytes=size, inputs_sha256=digest, built=built, added=added,
    )
