"""Write an OVA from a VM disk: streamOptimized VMDK, OVF descriptor, SHA256 manifest, tar.

``write_ova(disk_image, cfg, dest)`` writes the disk (qcow2 or raw) as a streamOptimized VMDK with
the parallel writer (``appliance.export.vmdk``) straight into its place in the archive, or, where
that writer cannot read the disk or ``output.vmdk_writer`` says so, with ``qemu-img`` into a work
file; writes the descriptor (``appliance.export.ovf``) and a manifest of ``SHA1(name)= hex`` or
``SHA256(name)= hex`` lines (the digest the format's record names: OVF 1.x prescribes SHA-1, OVF 2.0
SHA-256), and packs them into ``dest`` in the order OVF readers need: the ``.ovf`` first, the ``.mf``
right after it, then the files in ``References`` order.

The tar headers are plain POSIX ustar. A member of 8 GiB or more does not fit ustar's 11-digit
octal size field; POSIX's answer (a PAX extended header) is refused by VirtualBox's tar reader
(IPRT returns VERR_TAR_UNSUPPORTED_PAX_TYPE), while the base-256 size encoding (first byte
0x80, big-endian binary) is read by VirtualBox, GNU tar, bsdtar and Python's tarfile alike. So
exactly that one field switches to base-256 when, and only when, a member needs it.

The archive is written under a temporary name in the destination folder and renamed into
place only when complete (with the parallel writer the VMDK is written once, in place, and the
finished archive is read once for its digest); ``<ova>.sha256`` follows
in ``sha256sum`` format. On any failure the partial files are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from appliance.digest import sha256_file
from appliance.errors import CommandFailed, ExportError
from appliance.export.ovf import DiskFacts, output_format_for, ovf_descriptor
from appliance.export.vmdk import SourceLayout, UnsupportedSource, max_vmdk_size, source_layout, write_stream_vmdk
from appliance.formats import ManifestDigest, OutputFormat, OvfFormat
from appliance.log import human_size, log
from appliance.run import run

if TYPE_CHECKING:  # pragma: no cover
    from appliance.config import ApplianceConfig

BLOCK = 512
USTAR_MAX_SIZE = 8**11 - 1  # what 11 octal digits hold: 8 GiB - 1
CHUNK = 4 << 20
SUPPORTED_INPUT_FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class OvaResult:
    """The finished OVA: where it is, its digest and size, and what it holds."""

    path: Path
    sha256: str
    size: int
    sha256_file: Path
    members: tuple[str, ...]
    disk: DiskFacts
    ovf_format: OvfFormat
    output_format: str = "virtualbox-ova"  # the record's name (appliance.formats)


# -- tar headers ---------------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    """``width``-byte numeric field: octal digits, NUL-terminated (ustar)."""
    digits = f"{value:o}".encode()
    if len(digits) > width - 1:
        raise ValueError(f"{value} does not fit a {width}-byte octal field")
    return digits.rjust(width - 1, b"0") + b"\0"


def _base256(value: int, width: int) -> bytes:
    """``width``-byte numeric field in base-256 (GNU/star extension): 0x80 flag, then big-endian."""
    if value < 0 or value >= 1 << (8 * (width - 1)):
        raise ValueError(f"{value} does not fit a {width}-byte base-256 field")
    return b"\x80" + value.to_bytes(width - 1, "big")


def ustar_header(name: str, size: int, *, mtime: int = 0, mode: int = 0o644) -> bytes:
    """One 512-byte POSIX ustar header for a regular file; base-256 size only above 8 GiB - 1."""
    raw_name = name.encode("ascii")
    if not raw_name or len(raw_name) > 100 or "/" in name:
        raise ValueError(f"member name {name!r} must be 1-100 ASCII characters without '/'")
    size_field = _octal(size, 12) if size <= USTAR_MAX_SIZE else _base256(size, 12)
    header = bytearray(BLOCK)
    fields: list[tuple[int, bytes]] = [
        (0, raw_name),                 # name
        (100, _octal(mode, 8)),        # mode
        (108, _octal(0, 8)),           # uid
        (116, _octal(0, 8)),           # gid
        (124, size_field),             # size
        (136, _octal(mtime, 12)),      # mtime
        (148, b" " * 8),               # chksum, counted as spaces while summing
        (156, b"0"),                   # typeflag: regular file
        (257, b"ustar\0"),             # magic
        (263, b"00"),                  # version
    ]
    for offset, value in fields:
        header[offset:offset + len(value)] = value
    checksum = sum(header)
    header[148:156] = f"{checksum:06o}".encode() + b"\0 "
    return bytes(header)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


class _HashingWriter:
    """Writes through to a file while hashing and counting every byte."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.out.write(data)
        self.digest.update(data)
        self.size += len(data)


def _write_bytes_member(w: _HashingWriter, name: str, data: bytes, mtime: int) -> None:
    w.write(ustar_header(name, len(data), mtime=mtime))
    w.write(data)
    w.write(_padding(len(data)))


def _write_file_member(w: _HashingWriter, name: str, path: Path, size: int, mtime: int) -> None:
    w.write(ustar_header(name, size, mtime=mtime))
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    copied = 0
    with path.open("rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            w.write(view[:n])
            copied += n
    if copied != size:
        raise ExportError(f"{path} changed size while it was being packed ({size} -> {copied} bytes)")
    w.write(_padding(size))


# -- disk conversion ---------------------------------------------------------------------------


def disk_info(path: Path) -> dict[str, object]:
    """``qemu-img info --output=json`` of ``path`` (parsed)."""
    result = run(["qemu-img", "info", "--output=json", str(path)],
                 hint="is this a disk image qemu-img can read?")
    try:
        info = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise ExportError(f"qemu-img info printed something that is not JSON for {path}: {exc}") from None
    if not isinstance(info, dict):
        raise ExportError(f"qemu-img info gave no object for {path}")
    return info


def convert_to_stream_vmdk(source: Path, source_format: str, target: Path) -> None:
    """qemu-img: ``source`` (format given, never guessed) -> streamOptimized VMDK ``target``."""
    run(
        ["qemu-img", "convert", "-f", source_format, "-O", "vmdk", "-o", "subformat=streamOptimized",
         str(source), str(target)],
        hint="the source disk must not be in use by a running VM",
    )


_HASHLIB_NAME: dict[ManifestDigest, str] = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}


def member_digest(algorithm: ManifestDigest, data: bytes) -> str:
    """Hex digest of ``data`` with the manifest's ``algorithm``."""
    return hashlib.new(_HASHLIB_NAME[algorithm], data).hexdigest()


def manifest_text(entries: Iterable[tuple[str, str]], algorithm: ManifestDigest = "SHA256") -> bytes:
    """Manifest lines ``<ALG>(name)= hex`` (the form ovftool and OpenSSL write), LF-terminated."""
    return "".join(f"{algorithm}({name})= {hexdigest}\n" for name, hexdigest in entries).encode("ascii")


def _source_date_epoch() -> int:
    """Member times: ``$SOURCE_DATE_EPOCH`` for reproducible builds, else the build time (never 1970)."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(value) if value.isdigit() else int(time.time())


# -- the entry -----------------------------------------------------------------------------------


def write_ova(
    disk_image: Path,
    cfg: ApplianceConfig,
    dest: Path,
    *,
    output_format: OutputFormat | None = None,
    ovf_format: OvfFormat | None = None,
    include_vbox_machine: bool | None = None,
    mtime: int | None = None,
) -> OvaResult:
    """Turn ``disk_image`` (qcow2 or raw) into the OVA ``dest`` plus ``dest.sha256``.

    ``output_format`` is the OVA format's record (``appliance.formats``); ``ovf_format`` is short
    for the VirtualBox OVA of that OVF version; neither: the configuration's first OVA format.

    ``mtime`` stamps the tar members (default: ``$SOURCE_DATE_EPOCH``, else the build time, as
    VirtualBox's own exports do; set the variable for a layout that does not depend on the clock).
    """
    disk_image, dest = Path(disk_image), Path(dest)
    if dest.suffix != ".ova":
        raise ExportError(f"OVA destination {str(dest)!r} must end in .ova")
    if not disk_image.is_file():
        raise ExportError(f"disk image {str(disk_image)!r} does not exist or is not a file")
    record = output_format_for(cfg, output_format, ovf_format)
    assert record.ovf is not None  # output_format_for returns OVA formats only
    fmt, algorithm = record.ovf.version, record.ovf.manifest_digest
    stamp = _source_date_epoch() if mtime is None else mtime

    try:
        info = disk_info(disk_image)
    except CommandFailed as exc:
        raise ExportError(f"cannot read disk image {str(disk_image)!r}: {exc.message}") from None
    source_format = str(info.get("format", ""))
    if source_format not in SUPPORTED_INPUT_FORMATS:
        raise ExportError(
            f"disk image {str(disk_image)!r} is {source_format or 'of unknown format'}; "
            f"allowed: {', '.join(SUPPORTED_INPUT_FORMATS)}"
        )
    if info.get("backing-filename"):
        # Both VMDK writers flatten the chain, which is what we want; say so.
        log.info(f"disk has a backing file ({info['backing-filename']}); the OVA gets the flattened image")
    capacity = int(str(info.get("virtual-size", 0)))

    dest.parent.mkdir(parents=True, exist_ok=True)
    stem = dest.stem
    names = (f"{stem}.ovf", f"{stem}.mf", f"{stem}-disk001.vmdk")
    partial = dest.parent / f".{dest.name}.partial"
    sha_file = dest.parent / f"{dest.name}.sha256"
    sha_partial = dest.parent / f".{sha_file.name}.partial"
    # Fixed names, so a hard kill's leftovers are replaced by the next run; but never written
    # through: whatever sits there is removed and the files are created exclusively ("x"), so a
    # symlink planted under one of these names is not followed.
    for leftover in (partial, sha_partial):
        leftover.unlink(missing_ok=True)

    layout = _parallel_layout(disk_image, cfg)

    def manifest_for(ovf: bytes, disk: DiskFacts) -> bytes:
        return manifest_text([(names[0], member_digest(algorithm, ovf)), (names[2], disk_digest(disk))],
                             algorithm)

    def head(disk: DiskFacts) -> tuple[bytes, bytes]:
        ovf = ovf_descriptor(cfg, disk, output_format=record, include_vbox_machine=include_vbox_machine)
        return ovf, manifest_for(ovf, disk)

    def disk_digest(disk: DiskFacts) -> str:
        # The VMDK is hashed once, as it is written: SHA-256 always (the disk UUIDs derive from it),
        # and the manifest's own digest when that is another one.
        if algorithm == "SHA256":
            return disk.sha256
        if algorithm == "SHA1":
            return disk.sha1 or "0" * 40  # "0"s only while sizing the room for the head
        raise ExportError(f"the OVA writer does not write {algorithm} manifests (SHA1 or SHA256)")

    try:
        if layout is not None:
            disk, size = _pack_streaming(layout, cfg, names, capacity, head, manifest_for, partial, stamp,
                                         sha1=algorithm == "SHA1")
            with log.step(f"hash {dest.name}"):
                digest = sha256_file(partial)
        else:
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.work-") as work:
                disk, digest, size = _pack_from_qemu_img(
                    disk_image, source_format, Path(work), names, capacity, head, partial, stamp,
                    sha1=algorithm == "SHA1",
                )
        with sha_partial.open("x", encoding="ascii") as fh:
            fh.write(f"{digest}  {dest.name}\n")
        os.replace(partial, dest)
        os.replace(sha_partial, sha_file)
    except BaseException:
        partial.unlink(missing_ok=True)
        sha_partial.unlink(missing_ok=True)
        raise
    log.success(f"wrote {dest} ({human_size(size)}, sha256 {digest[:16]}...)")
    return OvaResult(
        path=dest, sha256=digest, size=size, sha256_file=sha_file,
        members=names, disk=disk, ovf_format=fmt, output_format=record.name,
    )


# -- the two ways to the VMDK ------------------------------------------------------------------


def _parallel_layout(disk_image: Path, cfg: ApplianceConfig) -> SourceLayout | None:
    """The disk's map when the parallel writer is chosen and can read it; else None (qemu-img)."""
    if cfg.output.vmdk_writer != "parallel":
        log.info("VMDK by qemu-img (output.vmdk_writer: qemu-img): one core")
        return None
    try:
        return source_layout(disk_image)
    except UnsupportedSource as exc:
        log.warning(f"VMDK by qemu-img instead of the parallel writer (one core, slower): {exc.message}")
        return None


def _pack_streaming(
    layout: SourceLayout,
    cfg: ApplianceConfig,
    names: tuple[str, str, str],
    capacity: int,
    head: Callable[[DiskFacts], tuple[bytes, bytes]],
    manifest_for: Callable[[bytes, DiskFacts], bytes],
    partial: Path,
    stamp: int,
    *,
    sha1: bool = False,
) -> tuple[DiskFacts, int]:
    """Write the VMDK straight into its place in the tar, then the descriptor and manifest before it.

    The descriptor and the manifest come first in the archive but depend on the VMDK's size
    and digest. Only the number of digits of the size can change their length, so room is
    reserved for the longest descriptor the size bound allows; when the real one needs fewer
    blocks, it is padded with newlines after the root element (valid XML) to keep the
    VMDK where it was written. Returns the disk facts and the archive size.
    """
    ovf_name, mf_name, disk_name = names
    bound = max_vmdk_size(layout, disk_name)
    ovf_max, mf_max = head(DiskFacts(href=disk_name, file_size=bound, capacity=capacity, sha256="0" * 64))
    ovf_room, mf_room = _blocks(len(ovf_max)), _blocks(len(mf_max))
    data_offset = BLOCK + ovf_room + BLOCK + mf_room + BLOCK
    level, workers = cfg.output.vmdk_compression_level, cfg.output.vmdk_workers
    with partial.open("xb", buffering=CHUNK) as raw:
        raw.seek(data_offset)
        with log.step(f"write {disk_name}: streamOptimized, compression level {level}, "
                      f"{workers or 'all'} worker(s), {human_size(layout.data_bytes)} of data"):
            if layout.compressed_files:
                log.info("the disk's chain holds compressed clusters: decompressing "
                         + ", ".join(Path(layout.files[d]).name for d in layout.compressed_files)
                         + " with qemu-img first")
            vmdk = write_stream_vmdk(layout, raw, name=disk_name, level=level, workers=workers,
                                     scratch=partial.parent, sha1=sha1)
        disk = DiskFacts(href=disk_name, file_size=vmdk.size, capacity=capacity, sha256=vmdk.sha256,
                         sha1=vmdk.sha1)
        ovf, manifest = head(disk)
        if _blocks(len(ovf)) < ovf_room:
            ovf += b"\n" * (ovf_room - BLOCK + 1 - len(ovf))
            manifest = manifest_for(ovf, disk)
        if _blocks(len(ovf)) != ovf_room or _blocks(len(manifest)) != mf_room:
            raise ExportError(  # cannot happen: the bound has the most digits
                f"descriptor ({len(ovf)} bytes) or manifest ({len(manifest)}) outgrew the room reserved for them"
            )
        raw.write(_padding(vmdk.size))
        raw.write(b"\0" * (2 * BLOCK))  # end-of-archive marker
        size = raw.tell()
        raw.seek(0)
        raw.write(ustar_header(ovf_name, len(ovf), mtime=stamp) + ovf + _padding(len(ovf)))
        raw.write(ustar_header(mf_name, len(manifest), mtime=stamp) + manifest + _padding(len(manifest)))
        raw.write(ustar_header(disk_name, vmdk.size, mtime=stamp))
        if raw.tell() != data_offset:
            raise ExportError(f"archive head ends at {raw.tell()}, the VMDK starts at {data_offset}")
        raw.flush()
        os.fsync(raw.fileno())
    log.info(f"VMDK: {human_size(vmdk.size)}, {vmdk.grains} grains, {vmdk.compressor}, {vmdk.workers} worker(s)")
    return disk, size


def _pack_from_qemu_img(
    disk_image: Path,
    source_format: str,
    work: Path,
    names: tuple[str, str, str],
    capacity: int,
    head: Callable[[DiskFacts], tuple[bytes, bytes]],
    partial: Path,
    stamp: int,
    *,
    sha1: bool = False,
) -> tuple[DiskFacts, str, int]:
    """qemu-img writes the VMDK to a work file; it is hashed, then copied into the archive."""
    ovf_name, mf_name, disk_name = names
    vmdk = work / disk_name
    with log.step(f"convert {disk_image.name} ({source_format}) to a streamOptimized VMDK with qemu-img"):
        convert_to_stream_vmdk(disk_image, source_format, vmdk)
    vmdk_size = vmdk.stat().st_size
    disk = DiskFacts(href=disk_name, file_size=vmdk_size, capacity=capacity, sha256=sha256_file(vmdk),
                     sha1=_sha1_file(vmdk) if sha1 else "")
    ovf, manifest = head(disk)
    with log.step(f"pack {partial.name.removeprefix('.').removesuffix('.partial')}"):
        with partial.open("xb") as raw:
            w = _HashingWriter(raw)
            _write_bytes_member(w, ovf_name, ovf, stamp)
            _write_bytes_member(w, mf_name, manifest, stamp)
            _write_file_member(w, disk_name, vmdk, vmdk_size, stamp)
            w.write(b"\0" * (2 * BLOCK))  # end-of-archive marker
            raw.flush()
            os.fsync(raw.fileno())
    return disk, w.digest.hexdigest(), w.size


def _sha1_file(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _blocks(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in the archive, padding included."""
    return -(-size // BLOCK) * BLOCK
