"""Disk-image making for the base box: Debian tree -> ext4 filesystem -> bootable raw disk.

Nothing here knows about Vagrant or a box format: ``appliance.basebox`` packages the raw disk
this module makes (qcow2 for vagrant-libvirt today; a VirtualBox box format can reuse it).

The kernel here shows no partition devices for loop devices, so nothing needs one: the
filesystem is built in its own file straight from the tree (``mke2fs -d``, no mount), the boot
loader is installed into that filesystem through a plain loop device of the filesystem file,
and the result is copied into a partitioned raw file at the partition's byte offset.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import PrerequisiteMissing
from appliance.log import log
from appliance.run import run, which

DATA_DIR = Path(__file__).resolve().parent / "data"
CUSTOMIZE_SCRIPT = DATA_DIR / "basebox-customize.sh"
# Every file the customize hook installs: all of them are inputs of the image.
CUSTOMIZE_FILES = (
    CUSTOMIZE_SCRIPT,
    DATA_DIR / "basebox-growroot.sh",
    DATA_DIR / "basebox-growroot.service",
    DATA_DIR / "basebox-ssh-hostkeys.service",
    DATA_DIR / "basebox-wired.network",
)
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
# The partition starts at 1 MiB, the usual alignment; the MBR and the gap before it hold nothing else.
PARTITION_OFFSET = 1024 * 1024
SECTOR = 512

# Kernel modules for hardware no appliance VM has (sound, GPUs, Wi-Fi, cameras, InfiniBand...):
# leaving them out of the image saves about 170 MB. dpkg keeps excluding them on kernel upgrades.
EXCLUDED_PATHS = (
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/doc/*",
    "/lib/modules/*/kernel/sound/*",
    "/lib/modules/*/kernel/drivers/gpu/*",
    "/lib/modules/*/kernel/drivers/media/*",
    "/lib/modules/*/kernel/drivers/net/wireless/*",
    "/lib/modules/*/kernel/drivers/infiniband/*",
    "/lib/modules/*/kernel/drivers/iio/*",
    "/lib/modules/*/kernel/drivers/staging/*",
    "/lib/modules/*/kernel/drivers/comedi/*",
    "/lib/modules/*/kernel/drivers/bluetooth/*",
    "/lib/modules/*/kernel/drivers/isdn/*",
    "/lib/modules/*/kernel/net/wireless/*",
    "/lib/modules/*/kernel/net/mac80211/*",
    "/lib/modules/*/kernel/net/bluetooth/*",
)
# Licences stay, even though the rest of /usr/share/doc goes.
INCLUDED_PATHS = ("/usr/share/doc/*/copyright",)

BASE_PACKAGES = (
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "systemd-resolved",
    "systemd-timesyncd",
    "openssh-server",
    "sudo",
    "ca-certificates",
    "netbase",
    "iproute2",
    "curl",
    "procps",
    "e2fsprogs",
    # sfdisk and partx grow the root partition on boot (basebox-growroot.sh); cloud-guest-utils
    # would do it too but pulls in Python (~50 MB).
    "fdisk",
)

REQUIRED_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "extlinux": "extlinux",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "chroot": "coreutils",
}


@dataclass(frozen=True)
class ImageSpec:
    """Everything that decides what the image contains. ``identity()`` is the cache key's part."""

    suite: str
    mirror: str
    security_mirror: str
    user: str
    authorized_key: str
    hostname: str
    root_uuid: str
    disk_bytes: int
    packages: tuple[str, ...] = BASE_PACKAGES
    excluded_paths: tuple[str, ...] = EXCLUDED_PATHS
    included_paths: tuple[str, ...] = INCLUDED_PATHS

    def sources(self) -> list[str]:
        """One-line apt sources, as mmdebstrap takes them (and writes them into the image)."""
        lines = [f"deb {self.mirror} {self.suite} main", f"deb {self.mirror} {self.suite}-updates main"]
        if self.security_mirror:
            lines.append(f"deb {self.security_mirror} {self.suite}-security main")
        return lines

    def identity(self) -> dict[str, object]:
        return {
            "suite": self.suite,
            "sources": self.sources(),
            "user": self.user,
            "authorized_key": self.authorized_key,
            "hostname": self.hostname,
            "root_uuid": self.root_uuid,
            "disk_bytes": self.disk_bytes,
            "packages": sorted(self.packages),
            "excluded_paths": list(self.excluded_paths),
            "included_paths": list(self.included_paths),
        }


def check_image_tools() -> None:
    """Fail before any work when a tool the image needs is missing, or we are not root."""
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if which(tool) is None})
    if not MBR_CODE.exists():
        missing.append("extlinux (syslinux-common: mbr.bin)")
    if missing:
        raise PrerequisiteMissing(
            "the base box needs tools that are not installed: " + ", ".join(missing),
            hint="apt-get install -y --no-install-recommends " + " ".join(sorted(set(missing))).split(" (")[0],
        )
    if os.geteuid() != 0:
        raise PrerequisiteMissing(
            "building the base box needs root (mmdebstrap in root mode, a loop device for the boot loader)",
            hint="run `invoke base-box` as root (sudo -E invoke base-box)",
        )


def bootstrap_tree(spec: ImageSpec, root_dir: Path, *, apt_archives: Path, env: Mapping[str, str]) -> None:
    """Install Debian into ``root_dir`` with mmdebstrap and run the customize hook on it.

    ``apt_archives`` keeps downloaded .deb files between builds, so a rebuild after a script
    change downloads nothing that did not change.
    """
    apt_archives.mkdir(parents=True, exist_ok=True)
    cache = shlex.quote(str(apt_archives))
    argv: list[str] = [
        "mmdebstrap",
        "--mode=root",
        "--variant=apt",
        "--architectures=amd64",
        "--include=" + ",".join(spec.packages),
        *(f"--dpkgopt=path-exclude={p}" for p in spec.excluded_paths),
        *(f"--dpkgopt=path-include={p}" for p in spec.included_paths),
        # initramfs-tools must not wait for a resume (swap) device the VM does not have.
        "--essential-hook=mkdir -p \"$1/etc/initramfs-tools/conf.d\" && "
        "echo RESUME=none > \"$1/etc/initramfs-tools/conf.d/resume\"",
        # Reuse and refill the host-side .deb cache.
        f"--setup-hook=mkdir -p \"$1/var/cache/apt/archives\" && "
        f"find {cache} -maxdepth 1 -name '*.deb' -exec cp -t \"$1/var/cache/apt/archives/\" {{}} +",
        f"--customize-hook=find \"$1/var/cache/apt/archives\" -maxdepth 1 -name '*.deb' -exec cp -u -t {cache} {{}} +",
        "--skip=download/empty",
        f"--customize-hook=bash {shlex.quote(str(CUSTOMIZE_SCRIPT))} \"$1\"",
        "--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb",
        spec.suite,
        str(root_dir),
        *spec.sources(),
    ]
    # INITRD=No skips the kernel package's own initramfs run, and initramfs-tools' trigger only
    # updates initramfs images that exist: the customize hook then makes it once, with every
    # package in, instead of twice (each run costs 10-30 s).
    run(argv, stream=True, env={**env, "INITRD": "No"},
        hint="see the mmdebstrap output above; a mirror problem shows as 'E:'")


def make_filesystem(tree: Path, fs_image: Path, *, size_bytes: int, uuid: str) -> None:
    """Build an ext4 filesystem holding ``tree`` in the file ``fs_image`` (no mount needed)."""
    fs_image.unlink(missing_ok=True)
    with fs_image.open("wb") as f:
        f.truncate(size_bytes)
    # extlinux 6.04 cannot boot from 64bit ext4; a root this size never needs that feature.
    run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^64bit,^metadata_csum_seed,^orphan_file",
            "-L", "root", "-U", uuid, "-d", str(tree), "-m", "1", str(fs_image),
        ],
        stream=True,
    )


def install_boot_loader(fs_image: Path) -> None:
    """Install extlinux into ``/boot/extlinux`` of the filesystem file, through a loop device.

    The loop device covers the filesystem file itself, so no partition device is needed.
    extlinux's boot sector takes the partition offset from the MBR at boot time.
    """
    loop = run(["losetup", "--find", "--show", str(fs_image)]).stdout.strip()
    try:
        with tempfile.TemporaryDirectory(prefix="csghub-basebox-mnt-") as mnt:
            run(["mount", "-t", "ext4", loop, mnt])
            try:
                run(["extlinux", "--install", os.path.join(mnt, "boot", "extlinux")], stream=True)
            finally:
                run(["umount", mnt])
    finally:
        run(["losetup", "--detach", loop], check=False)


def assemble_disk(fs_image: Path, disk_image: Path, *, disk_bytes: int) -> None:
    """Write an MBR disk: boot code, one bootable Linux partition at 1 MiB, the filesystem in it."""
    fs_bytes = fs_image.stat().st_size
    if PARTITION_OFFSET + fs_bytes > disk_bytes:
        raise ValueError(f"filesystem of {fs_bytes} bytes does not fit a {disk_bytes}-byte disk")
    disk_image.unlink(missing_ok=True)
    with disk_image.open("wb") as f:
        f.truncate(disk_bytes)
    _copy_sparse(fs_image, disk_image, PARTITION_OFFSET)
    with disk_image.open("r+b") as f:
        f.write(master_boot_record(MBR_CODE.read_bytes()[:440], PARTITION_OFFSET // SECTOR, fs_bytes // SECTOR))


def master_boot_record(boot_code: bytes, start_sector: int, sectors: int) -> bytes:
    """The first 512 bytes of the disk: boot code, one active Linux (0x83) partition, signature.

    Written here rather than with sfdisk: it is 16 bytes of table, and the build host then
    needs no partitioning tool. CHS fields hold the "use LBA" marker every BIOS understands.
    """
    if len(boot_code) > 440:
        raise ValueError("MBR boot code is at most 440 bytes")
    if start_sector + sectors > 0xFFFFFFFF:
        raise ValueError("an MBR partition cannot end beyond 2 TiB")
    lba_only_chs = b"\xfe\xff\xff"
    entry = (
        b"\x80" + lba_only_chs + b"\x83" + lba_only_chs
        + start_sector.to_bytes(4, "little") + sectors.to_bytes(4, "little")
    )
    disk_id = b"\x43\x53\x47\x48"  # "CSGH": any non-zero id; Linux uses it only for PARTUUID.
    record = boot_code.ljust(440, b"\0") + disk_id + b"\0\0" + entry + bytes(16 * 3) + b"\x55\xaa"
    assert len(record) == 512
    return record


def _copy_sparse(src: Path, dst: Path, offset: int, chunk: int = 4 * 1024 * 1024) -> None:
    """Copy ``src`` into ``dst`` at ``offset``, visiting only its data extents so ``dst`` stays sparse."""
    size = src.stat().st_size
    with src.open("rb") as fin, dst.open("r+b") as fout:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
                end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            except OSError:  # ENXIO: no data after pos
                break
            fin.seek(start)
            fout.seek(offset + start)
            remaining = end - start
            while remaining > 0:
                data = fin.read(min(chunk, remaining))
                if not data:
                    break
                fout.write(data)
                remaining -= len(data)
            pos = end


@dataclass
class BuiltImage:
    """A bootable raw disk and what it was made from."""

    raw_disk: Path
    spec: ImageSpec


def build_raw_disk(spec: ImageSpec, workdir: Path, *, apt_archives: Path) -> BuiltImage:
    """Make a bootable raw disk image for ``spec`` in ``workdir``, one logged step per phase."""
    check_image_tools()
    tree = workdir / "tree"
    fs_image = workdir / "root.ext4"
    raw = workdir / "disk.raw"
    env = {
        "BASEBOX_USER": spec.user,
        "BASEBOX_AUTHORIZED_KEY": spec.authorized_key,
        "BASEBOX_ROOT_UUID": spec.root_uuid,
        "BASEBOX_HOSTNAME": spec.hostname,
    }
    with log.step(f"bootstrap Debian {spec.suite} with mmdebstrap"):
        bootstrap_tree(spec, tree, apt_archives=apt_archives, env=env)
    with log.step("make the ext4 root filesystem"):
        make_filesystem(tree, fs_image, size_bytes=spec.disk_bytes - PARTITION_OFFSET, uuid=spec.root_uuid)
        remove_tree(tree)
    with log.step("install the extlinux boot loader"):
        install_boot_loader(fs_image)
    with log.step("partition the disk and copy the filesystem in"):
        assemble_disk(fs_image, raw, disk_bytes=spec.disk_bytes)
        fs_image.unlink()
    return BuiltImage(raw_disk=raw, spec=spec)


def remove_tree(path: Path) -> None:
    """Delete a work tree that may still have mounts in it (an interrupted mmdebstrap mounts /proc,
    /sys, /dev into its tree): unmount those first, and never cross into another filesystem."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        mountinfo = []
    mounts = [fields[4] for fields in (ln.split() for ln in mountinfo) if len(fields) > 4]
    for mount_point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        run(["umount", "--lazy", mount_point], check=False)
    run(["rm", "-rf", "--one-file-system", str(path)], check=False)
