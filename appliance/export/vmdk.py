"""A streamOptimized VMDK writer that compresses grains on every core.

A streamOptimized VMDK is a header, an embedded text descriptor, then a sequence of grains
(64 KiB of the disk each) deflated independently, each behind a small marker that names its
LBA; after the grains of one grain table's span (512 grains, 32 MiB) comes that grain table
behind its own marker, and at the end the grain directory, a footer (a copy of the header that
knows where the directory is) and an end-of-stream marker. Facts used here, as VirtualBox's
``VMDK.cpp`` and QEMU's ``block/vmdk.c`` read and write them:

- header: magic ``KDMV``, version 3, flags = valid-newline-test | compressed | markers,
  capacity in sectors, grain 128 sectors, 512 entries per grain table, ``gdOffset`` =
  "at end" (all ones) in the header and the real sector in the footer, ``overHead`` = the
  sector where the first marker is (VirtualBox's sequential reader starts there): header
  and descriptor padded to a whole grain (128 sectors), as VirtualBox's own writer does.
  With ``overHead`` = 2, VirtualBox 7.2's OVA import crashed (a general protection fault in
  its read-ahead thread, VBoxSVC gone, ``NS_ERROR_ABORT``) in 23 of 40 imports on a loaded
  host; padded, 0 of 100 (``benchmarks/vbox_import.py``),
  compression 1 (deflate);
- a grain is deflated as a zlib (RFC 1950) stream of the *whole* grain (the last grain of a
  disk whose size is not a multiple of 64 KiB is padded with zeros: both readers require a
  full grain when they inflate); its marker is ``uint64 LBA, uint32 compressed size``, and
  marker + data are padded to a sector;
- grains must come in increasing LBA order (VirtualBox's sequential reader, which imports
  OVAs, refuses to go back); a grain table entry holds the sector of the grain's marker;
- metadata markers are ``uint64 sectors, uint32 0, uint32 type`` in a sector of their own;
  grain tables whose entries are all empty are not written (VirtualBox does the same), their
  directory entry stays 0.

The disk is read through ``qemu-img map``: every data extent of a raw or qcow2 image (and of
its backing chain) has a host offset in some file, which is read directly with ``pread``.
Unallocated and zero extents are never read; grains that read as all zeros are skipped.
Compressed qcow2 clusters have no host offset: the image (of the chain) that holds them is
first decompressed once by ``qemu-img convert -O raw`` into a sparse scratch file, and those
extents are read from there (a Vagrant box image is usually compressed; the VM's own overlay
on top of it is not). What cannot be read either way (encrypted images, external data files,
other formats) raises ``UnsupportedSource``, and the caller falls back to ``qemu-img``.

Reading and compressing run in a thread pool (libdeflate, zlib and ``pread`` release the GIL);
the calling thread writes the results in LBA order and hashes every byte as it writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from appliance.errors import CommandFailed, ExportError
from appliance.run import run

try:  # libdeflate: 2-3x faster than zlib at level 6 and slightly smaller (see docs/export.md)
    import deflate as _libdeflate
except ImportError:  # pragma: no cover - it is a declared dependency; zlib keeps the writer working
    _libdeflate = None  # type: ignore[assignment]


def _zlib_stream(data: memoryview, level: int) -> bytes | bytearray:
    """``data`` as one zlib (RFC 1950) stream; the GIL is released while it compresses."""
    if _libdeflate is not None:
        return _libdeflate.zlib_compress(data, level)
    return zlib.compress(data, level)


COMPRESSOR = "libdeflate" if _libdeflate is not None else "zlib"

SECTOR = 512
GRAIN_SECTORS = 128
GRAIN = GRAIN_SECTORS * SECTOR  # 64 KiB
GT_ENTRIES = 512
GT_BYTES = GT_ENTRIES * 4
GT_SPAN = GRAIN * GT_ENTRIES  # 32 MiB of disk per grain table
MAGIC = 0x564D444B  # "KDMV" on disk
VERSION = 3
FLAG_VALID_NEWLINE_TEST = 1 << 0
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
# Grain table entries are 32-bit sector numbers: the VMDK itself must stay below 2 TiB.
MAX_VMDK_BYTES = (1 << 32) * SECTOR
# VirtualBox refuses sparse VMDKs of 256 TiB - 64 KiB and more.
MAX_CAPACITY = (256 << 40) - GRAIN
# One worker task: this many consecutive grains (1 MiB), read and compressed together.
CHUNK_GRAINS = 16
CHUNK = CHUNK_GRAINS * GRAIN
ZERO_GRAIN = bytes(GRAIN)
SUPPORTED_FORMATS = ("raw", "qcow2")
COMPRESSION_LEVELS = range(1, 10)


class UnsupportedSource(ExportError):
    """The disk cannot be read through its map (the reason says why); ``qemu-img`` can."""


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True)
class DataRun:
    """``length`` bytes of the virtual disk from ``start`` live at ``offset`` in file ``file``."""

    start: int
    length: int
    file: int
    offset: int  # -1: no host offset (compressed clusters), read from a decompressed copy


NO_OFFSET = -1


@dataclass(frozen=True)
class SourceLayout:
    """Where the data of a disk image is: its virtual size, its files and its data runs in LBA order."""

    virtual_size: int
    files: tuple[str, ...]
    runs: tuple[DataRun, ...]
    formats: tuple[str, ...] = ()

    @property
    def data_bytes(self) -> int:
        return sum(r.length for r in self.runs)

    @property
    def compressed_files(self) -> tuple[int, ...]:
        """The files (chain depths) holding data that has no host offset."""
        return tuple(sorted({r.file for r in self.runs if r.offset == NO_OFFSET}))


@dataclass(frozen=True)
class VmdkResult:
    """What was written: size and SHA256 of the VMDK bytes, and how."""

    size: int
    sha256: str
    capacity: int
    grains: int
    grain_tables: int
    workers: int
    level: int
    compressor: str
    sha1: str = ""  # also computed when asked (``sha1=True``): an OVF 1.x manifest's digest


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# -- reading the source through its map ----------------------------------------------------------


def _qemu_img_json(argv: list[str], what: str) -> object:
    try:
        result = run(argv, hint="is this a disk image qemu-img can read?")
    except CommandFailed as exc:
        raise ExportError(f"cannot read {what}: {exc.message}") from None
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise ExportError(f"qemu-img printed something that is not JSON for {what}: {exc}") from None


def source_layout(path: Path) -> SourceLayout:
    """Map ``path`` (raw or qcow2, with any backing chain of those) to host files and offsets.

    Raises ``UnsupportedSource`` for anything whose data cannot be read straight from a file.
    """
    path = Path(path)
    chain = _qemu_img_json(["qemu-img", "info", "--backing-chain", "--output=json", str(path)], str(path))
    if isinstance(chain, dict):
        chain = [chain]
    if not isinstance(chain, list) or not chain or not all(isinstance(i, dict) for i in chain):
        raise ExportError(f"qemu-img info gave no image list for {path}")
    files: list[str] = []
    formats: list[str] = []
    for depth, image in enumerate(chain):
        fmt = str(image.get("format", ""))
        formats.append(fmt)
        name = str(image.get("filename", ""))
        if fmt not in SUPPORTED_FORMATS:
            raise UnsupportedSource(f"{name or path} is {fmt or 'of unknown format'} (read directly: raw, qcow2)")
        if image.get("encrypted"):
            raise UnsupportedSource(f"{name} is encrypted")
        specific = image.get("format-specific", {})
        data = specific.get("data", {}) if isinstance(specific, dict) else {}
        if isinstance(data, dict) and data.get("data-file"):
            raise UnsupportedSource(f"{name} keeps its data in an external data file")
        if depth == 0:
            files.append(str(path.resolve()))
        else:
            parent = chain[depth - 1]
            backing = str(parent.get("full-backing-filename") or parent.get("backing-filename") or name)
            backing_path = Path(backing)
            if not backing_path.is_absolute():
                backing_path = Path(files[depth - 1]).parent / backing_path
            files.append(str(backing_path.resolve()))
    top_format = str(chain[0]["format"])
    virtual_size = int(chain[0].get("virtual-size", 0))
    if virtual_size <= 0 or virtual_size % SECTOR:
        raise UnsupportedSource(f"virtual size {virtual_size} of {path} is not a positive multiple of 512")
    if virtual_size > MAX_CAPACITY:
        raise UnsupportedSource(f"virtual size {virtual_size} of {path} is beyond what a sparse VMDK holds")

    entries = _qemu_img_json(["qemu-img", "map", "--output=json", "-f", top_format, str(path)], f"the map of {path}")
    if not isinstance(entries, list):
        raise ExportError(f"qemu-img map gave no extent list for {path}")
    runs: list[DataRun] = []
    covered = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise ExportError(f"qemu-img map gave a malformed extent for {path}: {entry!r}")
        start, length = int(entry["start"]), int(entry["length"])
        if start != covered:
            raise ExportError(f"qemu-img map of {path} skips from {covered} to {start}")
        covered = start + length
        if not entry.get("data") or entry.get("zero"):
            continue  # a hole or zeros: nothing to read, nothing to write
        depth = int(entry.get("depth", 0))
        if not 0 <= depth < len(files):
            raise ExportError(f"qemu-img map of {path} names backing depth {depth}, the chain has {len(files)}")
        if entry.get("compressed") or "offset" not in entry:
            if formats[depth] != "qcow2":
                raise UnsupportedSource(f"{files[depth]} has data at {start} that qemu-img map gives no place for")
            runs.append(DataRun(start, length, depth, NO_OFFSET))  # compressed clusters
        else:
            runs.append(DataRun(start, length, depth, int(entry["offset"])))
    if covered != virtual_size:
        raise ExportError(f"qemu-img map of {path} covers {covered} bytes, the disk has {virtual_size}")
    return SourceLayout(virtual_size, tuple(files), tuple(runs), tuple(formats))


def decompressed(layout: SourceLayout, scratch: Path) -> SourceLayout:
    """``layout`` with every extent that has no host offset read from a raw copy made in ``scratch``.

    Each image holding compressed clusters is converted once, whole, by ``qemu-img convert -O
    raw`` (sparse: only its data takes room); an extent allocated at depth d reads the same
    bytes from that copy at its own virtual offset.
    """
    files = list(layout.files)
    replacement: dict[int, int] = {}
    for depth in layout.compressed_files:
        copy = scratch / f"depth{depth}.raw"
        try:
            run(["qemu-img", "convert", "-f", layout.formats[depth], "-O", "raw", files[depth], str(copy)],
                hint="decompressing the compressed clusters of a qcow2 image needs room for its data")
        except CommandFailed as exc:
            raise ExportError(f"cannot decompress {files[depth]}: {exc.message}") from None
        replacement[depth] = len(files)
        files.append(str(copy))
    runs = tuple(
        DataRun(r.start, r.length, replacement[r.file], r.start) if r.offset == NO_OFFSET else r
        for r in layout.runs
    )
    return SourceLayout(layout.virtual_size, tuple(files), runs, layout.formats + ("raw",) * len(replacement))


@dataclass(frozen=True)
class _Chunk:
    """Up to ``CHUNK_GRAINS`` consecutive grains starting at ``first_grain`` and the reads that fill them."""

    first_grain: int
    pieces: tuple[tuple[int, int, int, int], ...]  # (offset in chunk, file, file offset, length)
    touched: frozenset[int]  # grain numbers within the chunk that hold read data


def _chunks(layout: SourceLayout) -> Iterator[_Chunk]:
    """The chunks holding data, in LBA order."""
    current = -1
    pieces: list[tuple[int, int, int, int]] = []
    touched: set[int] = set()
    for r in layout.runs:
        pos, end = r.start, r.start + r.length
        while pos < end:
            index = pos // CHUNK
            if index != current:
                if pieces:
                    yield _Chunk(current * CHUNK_GRAINS, tuple(pieces), frozenset(touched))
                current, pieces, touched = index, [], set()
            chunk_end = min(end, (index + 1) * CHUNK)
            within = pos - index * CHUNK
            pieces.append((within, r.file, r.offset + (pos - r.start), chunk_end - pos))
            touched.update(range(within // GRAIN, (within + chunk_end - pos - 1) // GRAIN + 1))
            pos = chunk_end
    if pieces:
        yield _Chunk(current * CHUNK_GRAINS, tuple(pieces), frozenset(touched))


def _grain_record(lba: int, compressed: bytes | bytearray) -> bytes:
    """Grain marker (LBA, size) + deflated data, padded to a sector."""
    head = struct.pack("<QI", lba, len(compressed))
    pad = -(len(head) + len(compressed)) % SECTOR
    return head + compressed + bytes(pad)


def _read_and_compress(chunk: _Chunk, fds: Sequence[int], level: int) -> list[tuple[int, bytes]]:
    """Read a chunk's data, deflate each grain that is not all zeros: ``[(grain, record)]``."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for within, file, offset, length in chunk.pieces:
        got = os.preadv(fds[file], [view[within:within + length]], offset)
        if got != length:
            raise ExportError(f"short read: {got} of {length} bytes at offset {offset} (did the disk change?)")
    records: list[tuple[int, bytes]] = []
    for i in sorted(chunk.touched):
        if buf.startswith(ZERO_GRAIN, i * GRAIN):  # a memcmp, no copy
            continue
        number = chunk.first_grain + i
        compressed = _zlib_stream(view[i * GRAIN:(i + 1) * GRAIN], level)
        records.append((number, _grain_record(number * GRAIN_SECTORS, compressed)))
    return records


# -- metadata ----------------------------------------------------------------------------------


def _marker(sectors: int, kind: int) -> bytes:
    return struct.pack("<QII", sectors, 0, kind).ljust(SECTOR, b"\0")


def _overhead(descriptor_sectors: int) -> int:
    """Sectors before the first marker: header and descriptor, padded to a whole grain as VirtualBox does."""
    return -(-(1 + descriptor_sectors) // GRAIN_SECTORS) * GRAIN_SECTORS


def _header(capacity_sectors: int, descriptor_sectors: int, gd_offset: int) -> bytes:
    header = struct.pack(
        "<IIIQQQQIQQQB4sH",
        MAGIC,
        VERSION,
        FLAG_VALID_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity_sectors,
        GRAIN_SECTORS,
        1,  # descriptor offset: right after the header
        descriptor_sectors,
        GT_ENTRIES,
        0,  # no redundant grain directory
        gd_offset,
        _overhead(descriptor_sectors),  # overHead: where the first marker is
        0,  # clean
        b"\n \r\n",  # the newline-detection characters
        COMPRESSION_DEFLATE,
    )
    return header.ljust(SECTOR, b"\0")


def descriptor_text(name: str, capacity_sectors: int) -> bytes:
    """The embedded descriptor: one sparse extent, this file, no parent."""
    if not name or '"' in name or "\n" in name or not name.isascii():
        raise ValueError(f"VMDK extent name {name!r} must be non-empty ASCII without quotes or newlines")
    # The content ID only has to differ from a parent's; deriving it from the name and size
    # keeps the output reproducible (qemu-img picks a random one).
    cid = zlib.crc32(f"{name}:{capacity_sectors}".encode()) or 1
    cylinders = min(capacity_sectors // (16 * 63), 16383)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="streamOptimized"\n'
        "\n"
        "# Extent description\n"
        f'RW {capacity_sectors} SPARSE "{name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.virtualHWVersion = "4"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "16"\n'
        'ddb.geometry.sectors = "63"\n'
        'ddb.adapterType = "ide"\n'
    ).encode("ascii")


def max_vmdk_size(layout: SourceLayout, name: str) -> int:
    """An upper bound of the VMDK's size: every data grain incompressible, every table written."""
    capacity = layout.virtual_size // SECTOR
    metadata = _overhead(-(-len(descriptor_text(name, capacity)) // SECTOR)) * SECTOR  # header + descriptor
    grains = len({g for r in layout.runs for g in range(r.start // GRAIN, (r.start + r.length - 1) // GRAIN + 1)})
    worst_grain = -(-(12 + len(_zlib_stream(memoryview(os.urandom(GRAIN)), 1)) + 64) // SECTOR) * SECTOR
    tables = -(-layout.virtual_size // GT_SPAN)
    gd = -(-tables * 4 // SECTOR) * SECTOR
    return metadata + grains * worst_grain + tables * (SECTOR + GT_BYTES) + SECTOR + gd + 3 * SECTOR


# -- the writer --------------------------------------------------------------------------------


class _Out:
    """Sequential output that counts and hashes every byte."""

    def __init__(self, out: _Writable, *, sha1: bool = False) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.sha1 = hashlib.sha1() if sha1 else None
        self.pos = 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.digest.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)
        self.pos += len(data)


def write_stream_vmdk(
    source: Path | SourceLayout,
    out: _Writable,
    *,
    name: str,
    level: int = 6,
    workers: int = 0,
    scratch: Path | None = None,
    sha1: bool = False,
) -> VmdkResult:
    """Write ``source`` as a streamOptimized VMDK to ``out`` (written strictly in order).

    ``name`` is the file name the descriptor's extent line gives (the VMDK's own name);
    ``level`` the compression level (1-9); ``workers`` the compression threads (0: every core);
    ``scratch`` the folder for decompressed copies of compressed qcow2 images (default: the
    system's temporary folder), removed when done; ``sha1`` hashes the output with SHA-1 as well
    (``VmdkResult.sha1``), for a manifest that names SHA-1 (OVF 1.x).
    """
    if level not in COMPRESSION_LEVELS:
        raise ExportError(f"VMDK compression level {level} is not allowed (1-9)")
    if workers < 0:
        raise ExportError(f"VMDK workers {workers} is not allowed (0 = every core, or a positive count)")
    layout = source if isinstance(source, SourceLayout) else source_layout(Path(source))
    if layout.compressed_files:
        with tempfile.TemporaryDirectory(prefix=".vmdk-scratch-", dir=scratch) as tmp:
            return _write(decompressed(layout, Path(tmp)), out, name=name, level=level, workers=workers, sha1=sha1)
    return _write(layout, out, name=name, level=level, workers=workers, sha1=sha1)


def _write(layout: SourceLayout, out: _Writable, *, name: str, level: int, workers: int,
           sha1: bool = False) -> VmdkResult:
    threads = workers or default_workers()
    capacity = layout.virtual_size // SECTOR
    descriptor = descriptor_text(name, capacity)
    desc_sectors = -(-len(descriptor) // SECTOR)
    gd_entries = -(-capacity // (GT_ENTRIES * GRAIN_SECTORS))

    w = _Out(out, sha1=sha1)
    w.write(_header(capacity, desc_sectors, GD_AT_END))
    w.write(descriptor.ljust((_overhead(desc_sectors) - 1) * SECTOR, b"\0"))

    directory = [0] * gd_entries
    table = [0] * GT_ENTRIES
    table_index = -1
    grains = tables = 0

    def flush_table() -> None:
        nonlocal tables
        if table_index < 0 or not any(table):
            return
        w.write(_marker(GT_BYTES // SECTOR, MARKER_GT))
        directory[table_index] = w.pos // SECTOR
        w.write(struct.pack(f"<{GT_ENTRIES}I", *table))
        tables += 1

    def emit(number: int, record: bytes) -> None:
        nonlocal table_index, grains
        if number // GT_ENTRIES != table_index:
            flush_table()
            table_index = number // GT_ENTRIES
            table[:] = [0] * GT_ENTRIES
        if w.pos + len(record) > MAX_VMDK_BYTES:
            raise ExportError("the VMDK would pass 2 TiB, beyond what its 32-bit grain tables address")
        table[number % GT_ENTRIES] = w.pos // SECTOR
        w.write(record)
        grains += 1

    fds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in layout.files]
    try:
        for fd in fds:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a hint: more read-ahead
            except OSError:
                pass
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vmdk") as pool:
            pending: deque[Future[list[tuple[int, bytes]]]] = deque()
            try:
                for chunk in _chunks(layout):
                    pending.append(pool.submit(_read_and_compress, chunk, fds, level))
                    # A bounded window keeps memory flat and the output in order.
                    while len(pending) >= threads * 4:
                        for number, record in pending.popleft().result():
                            emit(number, record)
                while pending:
                    for number, record in pending.popleft().result():
                        emit(number, record)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        for fd in fds:
            os.close(fd)

    flush_table()
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    w.write(_marker(gd_sectors, MARKER_GD))
    gd_offset = w.pos // SECTOR
    w.write(struct.pack(f"<{gd_entries}I", *directory).ljust(gd_sectors * SECTOR, b"\0"))
    w.write(_marker(1, MARKER_FOOTER))
    w.write(_header(capacity, desc_sectors, gd_offset))
    w.write(_marker(0, MARKER_EOS))
    return VmdkResult(
        size=w.pos, sha256=w.digest.hexdigest(), capacity=layout.virtual_size,
        grains=grains, grain_tables=tables, workers=threads, level=level, compressor=COMPRESSOR,
        sha1=w.sha1.hexdigest() if w.sha1 is not None else "",
    )
