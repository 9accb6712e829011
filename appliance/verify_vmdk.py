"""Read an untrusted streamOptimized VMDK the way both importers read it, before anything else opens it.

VirtualBox's OVA import reads a streamOptimized VMDK *sequentially*: marker after marker, each
grain placed at the LBA its own marker names (the grain tables are skipped). QEMU (``qemu-img``,
and a QEMU boot of the copy) reads it through the *grain directory* named by the footer, the
grain tables it points to, and the grain each table entry points to. Two different disks can
hide in one file: a table entry pointing at another grain's marker, a grain no table lists, a
directory entry past the end of the file (QEMU reads zeros there). And QEMU opens the extents
that an embedded descriptor names when the header's capacity is 0 (``block/vmdk.c``,
``vmdk_open_vmdk4``): any file on the host, a FIFO that blocks ``qemu-img`` forever included.

``walk_stream_vmdk`` walks the stream once, sequentially, with memory bounded by one grain and
the grain directory, and refuses every file in which the two readings could differ:

- header (and the footer, a copy of it): magic ``KDMV``, version 3, flags exactly
  valid-newline-test | compressed | markers (optional newline bit), capacity > 0 and at most
  2^56 bytes, grain 128 sectors, 512 entries per table, deflate, ``gdOffset`` "at end" in the
  header and in the footer the sector of the directory the walk found, no redundant directory,
  clean; the embedded descriptor inside the header's overhead;
- embedded descriptor: ``createType="streamOptimized"``, exactly one extent,
  ``RW|RDONLY <capacity> SPARSE "<this file's own name>"``, no parent (``parentCID`` absent or
  ``ffffffff``, no ``parentFileNameHint``);
- markers from ``overHead`` on: grains in strictly increasing LBA order (VirtualBox's
  sequential reader cannot go back), grain-aligned and inside the capacity, each inflating to
  exactly one whole 64 KiB grain with nothing left over; each grain table right after the grains
  of its span, listing exactly those grains at exactly their markers; one directory listing
  exactly those tables; the footer; the end-of-stream marker as the file's last sector. Nothing
  may point past the end of the file, and no other marker type may appear.

The result carries a digest of what both readers read: sha256 over (LBA, 64 KiB) of every grain
that is not all zeros, in LBA order (``content_digest``; ``raw_content_digest`` computes the
same from a raw image, so a test can compare it with what VirtualBox and ``qemu-img convert``
wrote).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from appliance.export.vmdk import (
    COMPRESSION_DEFLATE,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_VALID_NEWLINE_TEST,
    GD_AT_END,
    GRAIN,
    GRAIN_SECTORS,
    GT_ENTRIES,
    MAGIC,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    SECTOR,
)
from appliance.inputs import open_regular

HEADER = struct.Struct("<IIIQQQQIQQQB4sH")
GRAIN_MARKER = struct.Struct("<QI")
META_MARKER = struct.Struct("<QII")
GT_SECTORS = GT_ENTRIES * 4 // SECTOR
FLAG_REDUNDANT_GT = 1 << 1
MAX_CAPACITY_BYTES = 1 << 56  # as appliance.export.ovf.MAX_CAPACITY
MAX_DESCRIPTOR_SECTORS = 2048  # 1 MiB; VirtualBox and our writer use 1-20
MAX_FINDINGS = 20
_EXTENT = re.compile(r'(RW|RDONLY) ([0-9]+) SPARSE "([^"]*)"')
_KEY_VALUE = re.compile(r'([A-Za-z0-9_.]+) *= *"?([^"]*)"?')


class VmdkRefused(Exception):
    """The walk stops at the first problem that leaves nothing after it readable the same way."""


@dataclass
class VmdkWalk:
    """What the walk found; ``problems`` empty means both readers read ``content_digest``."""

    capacity: int = 0  # bytes
    grains: int = 0  # grain markers (compressed grains) in the stream
    data_grains: int = 0  # of them, grains that are not all zeros
    grain_tables: int = 0
    content_digest: str = ""
    inflate: bool = True
    problems: list[str] = field(default_factory=list)


def raw_content_digest(f: io.BufferedIOBase, size: int) -> str:
    """The ``content_digest`` of a raw image of ``size`` bytes: (LBA, grain) of every non-zero grain."""
    digest = hashlib.sha256()
    zero = bytes(GRAIN)
    for number in range(-(-size // GRAIN)):
        grain = f.read(GRAIN)
        grain = grain + bytes(GRAIN - len(grain))
        if grain != zero:
            digest.update(struct.pack("<Q", number * GRAIN_SECTORS))
            digest.update(grain)
    return digest.hexdigest()


class _Window(io.RawIOBase):
    """``length`` bytes of ``f`` from ``base`` on, as a file of its own (a member inside an OVA)."""

    def __init__(self, f: io.BufferedReader, base: int, length: int) -> None:
        self.f, self.base, self.length, self.pos = f, base, length, 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = offset if whence == io.SEEK_SET else self.length + offset if whence == io.SEEK_END else \
            self.pos + offset
        return self.pos

    def read(self, size: int = -1) -> bytes:
        size = self.length - self.pos if size < 0 else min(size, max(0, self.length - self.pos))
        self.f.seek(self.base + self.pos)
        data = self.f.read(size)
        self.pos += len(data)
        return data


def walk_stream_vmdk(path: Path, name: str, window: tuple[int, int] | None = None, *,
                     inflate: bool = True) -> VmdkWalk:
    """Walk ``path`` (a streamOptimized VMDK whose own file name in the OVA is ``name``); with
    ``window`` (offset, length), the VMDK is those bytes of ``path`` (a member of an OVA, read in place).
    Without ``inflate`` the grains are not decompressed (no ``content_digest``): the layout alone,
    in a fraction of the time (publish's re-check of an OVA verify inflated already)."""
    walk = VmdkWalk(inflate=inflate)
    try:
        with open_regular(path) as whole:
            f: io.IOBase = whole if window is None else _Window(whole, *window)
            size = f.seek(0, io.SEEK_END)
            _walk(f, size, name, walk)  # type: ignore[arg-type]
    except VmdkRefused as exc:
        walk.problems.append(str(exc))
    except OSError as exc:
        walk.problems.append(f"reading it failed: {exc.strerror or exc}")
    del walk.problems[MAX_FINDINGS:]
    if walk.problems:
        walk.content_digest = ""
    return walk


def _read(f: io.BufferedIOBase, offset: int, length: int, size: int, what: str) -> bytes:
    if offset < 0 or offset + length > size:
        raise VmdkRefused(f"{what} at byte {offset} runs past the end of the file ({size} bytes)")
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise VmdkRefused(f"{what} at byte {offset}: the file ended early")
    return data


def _header(raw: bytes, what: str) -> tuple[int, ...]:
    fields = HEADER.unpack_from(raw)
    magic, version, flags, capacity, grain, desc_off, desc_len, gtes, rgd, _gd, overhead, unclean, _nl, comp = fields
    if magic != MAGIC:
        raise VmdkRefused(f"{what}: not a sparse VMDK (no 'KDMV' header); a descriptor VMDK may name other files")
    if version != 3:
        raise VmdkRefused(f"{what}: version {version}; a streamOptimized VMDK is version 3")
    allowed = FLAG_VALID_NEWLINE_TEST | FLAG_REDUNDANT_GT | FLAG_COMPRESSED | FLAG_MARKERS
    if flags & ~allowed or not flags & FLAG_COMPRESSED or not flags & FLAG_MARKERS:
        raise VmdkRefused(f"{what}: flags {flags:#x}; a streamOptimized VMDK has compressed grains with markers "
                          "and nothing else (no zeroed grain tables)")
    if capacity == 0:
        raise VmdkRefused(f"{what}: capacity 0; QEMU then opens the extents its embedded descriptor names "
                          "(any file on the host)")
    if capacity * SECTOR > MAX_CAPACITY_BYTES:
        raise VmdkRefused(f"{what}: capacity {capacity} sectors is beyond the allowed {MAX_CAPACITY_BYTES} bytes")
    if grain != GRAIN_SECTORS or gtes != GT_ENTRIES or comp != COMPRESSION_DEFLATE:
        raise VmdkRefused(f"{what}: grain {grain} sectors, {gtes} entries per table, compression {comp}; "
                          f"allowed: {GRAIN_SECTORS}, {GT_ENTRIES}, deflate")
    if bool(rgd) != bool(flags & FLAG_REDUNDANT_GT) or unclean:
        raise VmdkRefused(f"{what}: a redundant grain directory without its flag (or the reverse), or the "
                          "unclean-shutdown mark")
    if not 1 <= desc_len <= MAX_DESCRIPTOR_SECTORS or desc_off < 1 or desc_off + desc_len > overhead:
        raise VmdkRefused(f"{what}: embedded descriptor at sector {desc_off}, {desc_len} sectors, is not inside the "
                          f"header's overhead of {overhead} sectors")
    return fields


def _check_descriptor(text: bytes, capacity: int, name: str) -> None:
    body = text.split(b"\0", 1)[0]
    try:
        lines = body.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise VmdkRefused("its embedded descriptor is not ASCII text") from None
    extents: list[tuple[int, str]] = []
    create_type = ""
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := _EXTENT.fullmatch(line):
            extents.append((int(m.group(2)[:20]), m.group(3)))
            continue
        if line.split(" ", 1)[0] in ("RW", "RDONLY", "NOACCESS"):
            raise VmdkRefused(f"its embedded descriptor names an extent other than one SPARSE file: {line[:80]!r}")
        kv = _KEY_VALUE.fullmatch(line)
        if kv is None:
            raise VmdkRefused(f"its embedded descriptor holds a line neither reader reads the same way: {line[:80]!r}")
        key, value = kv.group(1), kv.group(2).strip()
        if key == "createType":
            create_type = value
        elif key == "parentCID" and value.lower() != "ffffffff":
            raise VmdkRefused(f"its embedded descriptor names a parent disk (parentCID={value[:20]})")
        elif key.lower() == "parentfilenamehint":
            raise VmdkRefused(f"its embedded descriptor names a parent file {value[:80]!r}")
    if create_type != "streamOptimized":
        raise VmdkRefused(f"its embedded descriptor says createType {create_type[:40]!r}, not streamOptimized")
    if len(extents) != 1:
        raise VmdkRefused(f"its embedded descriptor names {len(extents)} extents; one, the file itself, is allowed")
    sectors, extent = extents[0]
    if extent != name:
        raise VmdkRefused(f"its embedded descriptor names the extent {extent[:80]!r}, not the file itself ({name!r})")
    if sectors != capacity:
        raise VmdkRefused(f"its embedded descriptor's extent has {sectors} sectors, the header {capacity}")


_ZERO_GRAIN = bytes(GRAIN)


def _grain(f: io.BufferedIOBase, pos: int, lba: int, length: int, size: int, where: str,
           digest: hashlib._Hash, walk: VmdkWalk) -> None:
    """Inflate the grain whose marker is at ``pos``: exactly one whole grain, nothing left over.

    The last grain of a disk whose size is not a whole number of grains may instead hold exactly
    the sectors left (QEMU writes it so); it is read as padded with zeros."""
    tail = (walk.capacity // SECTOR - lba) * SECTOR
    whole = GRAIN if tail >= GRAIN else None
    if length > GRAIN + 1024:
        raise VmdkRefused(f"{where}: {length} compressed bytes for a {GRAIN}-byte grain")
    walk.grains += 1
    if not walk.inflate:
        if pos + GRAIN_MARKER.size + length > size:
            raise VmdkRefused(f"{where} runs past the end of the file ({size} bytes)")
        return
    data = _read(f, pos + GRAIN_MARKER.size, length, size, where)
    inflater = zlib.decompressobj()
    try:
        grain = inflater.decompress(data, GRAIN + 1)
    except zlib.error as exc:
        raise VmdkRefused(f"{where}: its data does not inflate ({exc})") from None
    if len(grain) not in (GRAIN, whole or tail) or not inflater.eof or inflater.unused_data \
            or inflater.unconsumed_tail:
        raise VmdkRefused(f"{where}: its data is not exactly one deflated {GRAIN}-byte grain")
    grain += bytes(GRAIN - len(grain))
    if grain != _ZERO_GRAIN:
        digest.update(struct.pack("<Q", lba))
        digest.update(grain)
        walk.data_grains += 1


def _tables_in_header(f: io.BufferedIOBase, size: int, gd: int, overhead: int, gd_entries: int,
                      what: str) -> list[bytes]:
    """The grain tables a directory in the header area lists (b"" for an empty slot), all inside it."""
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    if gd < 1 or gd + gd_sectors > overhead:
        raise VmdkRefused(f"{what} at sector {gd} is not inside the header's overhead of {overhead} sectors")
    entries = struct.unpack(f"<{gd_entries}I", _read(f, gd * SECTOR, gd_entries * 4, size, what))
    tables = []
    for i, sector in enumerate(entries):
        if not sector:
            tables.append(b"")
            continue
        if sector + GT_SECTORS > overhead:
            beyond = " (past the end of the file)" if sector * SECTOR >= size else ""
            raise VmdkRefused(f"{what} entry {i} points to sector {sector}{beyond}, outside the header's overhead "
                              f"of {overhead} sectors")
        tables.append(_read(f, sector * SECTOR, GT_SECTORS * SECTOR, size, "grain table"))
    return tables


def _walk_header_directory(f: io.BufferedIOBase, size: int, header: tuple[int, ...], gd_entries: int,
                           walk: VmdkWalk) -> None:
    """QEMU's streamOptimized layout (``qemu-img convert -o subformat=streamOptimized``): the grain
    directory and tables (and their redundant copies) in the header area, then only grain markers
    and the end-of-stream marker. Each grain marker, in stream order, must be the next entry the
    tables list, in LBA order, and the tables may list nothing else."""
    capacity, rgd, gd, overhead = header[3], header[8], header[9], header[10]
    tables = _tables_in_header(f, size, gd, overhead, gd_entries, "grain directory")
    if rgd and _tables_in_header(f, size, rgd, overhead, gd_entries, "redundant grain directory") != tables:
        raise VmdkRefused("the redundant grain directory and tables differ from the primary ones")
    listed = ((i * GT_ENTRIES + j, s) for i, t in enumerate(tables) if t
              for j, s in enumerate(struct.unpack(f"<{GT_ENTRIES}I", t)) if s)
    digest = hashlib.sha256()
    pos = overhead * SECTOR
    while True:
        head = _read(f, pos, META_MARKER.size, size, "marker")
        lba, length = GRAIN_MARKER.unpack_from(head)
        where = f"marker at byte {pos}"
        expected = next(listed, None)
        if not length:
            sectors, _, kind = META_MARKER.unpack_from(head)
            if kind != MARKER_EOS or sectors:
                raise VmdkRefused(f"{where}: a metadata marker (type {kind}) in a VMDK whose grain directory is in "
                                  "its header")
            if expected is not None:
                raise VmdkRefused(f"the grain tables list grain {expected[0]} at sector {expected[1]}, which the "
                                  "stream does not hold (QEMU reads through the table, VirtualBox the markers)")
            if any(_read(f, pos + SECTOR, size - pos - SECTOR, size, "the end")):
                raise VmdkRefused(f"{where}: data after the end-of-stream marker")
            break
        if lba >= capacity or lba % GRAIN_SECTORS:
            raise VmdkRefused(f"{where}: LBA {lba} is not a grain inside the capacity of {capacity} sectors")
        if expected != (lba // GRAIN_SECTORS, pos // SECTOR):
            raise VmdkRefused(f"grain marker at byte {pos} (LBA {lba}) and the grain tables disagree (QEMU reads "
                              "through the table, VirtualBox the markers)")
        _grain(f, pos, lba, length, size, where, digest, walk)
        pos += -(-(GRAIN_MARKER.size + length) // SECTOR) * SECTOR
    walk.grain_tables = sum(1 for t in tables if t)
    walk.content_digest = digest.hexdigest() if walk.inflate else ""


def _walk(f: io.BufferedIOBase, size: int, name: str, walk: VmdkWalk) -> None:
    if _read(f, 0, min(size, 4), size, "header") != struct.pack("<I", MAGIC):
        raise VmdkRefused("header: not a sparse VMDK (no 'KDMV' header); a descriptor VMDK may name other files")
    header = _header(_read(f, 0, SECTOR, size, "header"), "header")
    if size % SECTOR:
        raise VmdkRefused(f"its size {size} is not a whole number of sectors")
    capacity, desc_off, desc_len, gd_at, overhead = header[3], header[5], header[6], header[9], header[10]
    _check_descriptor(_read(f, desc_off * SECTOR, desc_len * SECTOR, size, "embedded descriptor"), capacity, name)
    walk.capacity = capacity * SECTOR
    gd_entries = -(-capacity // (GRAIN_SECTORS * GT_ENTRIES))
    if gd_at != GD_AT_END:
        _walk_header_directory(f, size, header, gd_entries, walk)
        return
    if header[2] & FLAG_REDUNDANT_GT:
        raise VmdkRefused("header: a redundant grain table with the grain directory at the end")

    digest = hashlib.sha256()
    tables: dict[int, int] = {}  # directory index -> sector of the table
    pending: dict[int, int] = {}  # grains since the last table: LBA -> sector of the marker
    last_lba = -1
    directory_sector = -1
    footer_seen = False
    pos = overhead * SECTOR
    while True:
        head = _read(f, pos, META_MARKER.size, size, "marker")
        value, length = GRAIN_MARKER.unpack_from(head)
        if length:  # a grain: LBA, compressed size, data
            lba = value
            where = f"grain marker at byte {pos}"
            if footer_seen or directory_sector >= 0:
                raise VmdkRefused(f"{where}: a grain after the grain directory")
            if lba % GRAIN_SECTORS or lba >= capacity:
                raise VmdkRefused(f"{where}: LBA {lba} is not a grain inside the capacity of {capacity} sectors")
            if lba <= last_lba:
                raise VmdkRefused(f"{where}: LBA {lba} after LBA {last_lba}; grains must come in increasing order "
                                  "(VirtualBox's sequential reader cannot go back)")
            if pending and lba // (GRAIN_SECTORS * GT_ENTRIES) != next(iter(pending)) // (GRAIN_SECTORS * GT_ENTRIES):
                raise VmdkRefused(f"{where}: a grain of the next table's span before the grain table of the last")
            if length > GRAIN + 1024:
                raise VmdkRefused(f"{where}: {length} compressed bytes for a {GRAIN}-byte grain")
            _grain(f, pos, lba, length, size, where, digest, walk)
            pending[lba] = pos // SECTOR
            last_lba = lba
            pos += -(-(GRAIN_MARKER.size + length) // SECTOR) * SECTOR
            continue
        sectors, _, kind = META_MARKER.unpack_from(head)
        where = f"metadata marker at byte {pos}"
        if kind == MARKER_GT:
            if sectors != GT_SECTORS or not pending or directory_sector >= 0:
                raise VmdkRefused(f"{where}: a grain table that does not follow the grains of its span")
            data = _read(f, pos + SECTOR, GT_SECTORS * SECTOR, size, "grain table")
            index = next(iter(pending)) // (GRAIN_SECTORS * GT_ENTRIES)
            entries = struct.unpack(f"<{GT_ENTRIES}I", data)
            listed = {(index * GT_ENTRIES + i) * GRAIN_SECTORS: s for i, s in enumerate(entries) if s}
            if listed != pending:
                raise VmdkRefused(f"grain table at byte {pos + SECTOR} and the grain markers before it disagree "
                                  "(QEMU reads through the table, VirtualBox the markers)")
            tables[index] = pos // SECTOR + 1
            walk.grain_tables += 1
            pending = {}
            pos += SECTOR + GT_SECTORS * SECTOR
        elif kind == MARKER_GD:
            gd_sectors = -(-gd_entries * 4 // SECTOR)
            if pending or directory_sector >= 0 or sectors != gd_sectors:
                raise VmdkRefused(f"{where}: a grain directory of {sectors} sectors out of place "
                                  f"(expected one of {gd_sectors} after the last grain table)")
            data = _read(f, pos + SECTOR, gd_sectors * SECTOR, size, "grain directory")
            entries = struct.unpack_from(f"<{gd_entries}I", data)
            listed = {i: s for i, s in enumerate(entries) if s}
            if listed != tables or any(data[gd_entries * 4:]):
                beyond = [s for s in listed.values() if s * SECTOR >= size]
                why = f"points past the end of the file (sector {beyond[0]})" if beyond else \
                    "lists other grain tables than the stream holds"
                raise VmdkRefused(f"grain directory at byte {pos + SECTOR} {why}")
            directory_sector = pos // SECTOR + 1
            pos += SECTOR + gd_sectors * SECTOR
        elif kind == MARKER_FOOTER:
            if directory_sector < 0 or footer_seen or sectors != 1:
                raise VmdkRefused(f"{where}: a footer out of place (it follows the grain directory, once)")
            footer = _header(_read(f, pos + SECTOR, SECTOR, size, "footer"), "footer")
            if footer[9] != directory_sector:
                raise VmdkRefused(f"footer: the grain directory is at sector {footer[9]}, the stream has it at "
                                  f"{directory_sector} (QEMU reads the footer's, VirtualBox the stream's)")
            if footer[:9] != header[:9] or footer[10:] != header[10:]:
                raise VmdkRefused("footer and header differ in more than the grain directory's place")
            footer_seen = True
            pos += 2 * SECTOR
        elif kind == MARKER_EOS and sectors == 0:
            if not footer_seen:
                raise VmdkRefused(f"{where}: the stream ends before its grain directory and footer")
            if pos + SECTOR != size:
                raise VmdkRefused(f"{where}: {size - pos - SECTOR} bytes after the end-of-stream marker")
            break
        else:
            raise VmdkRefused(f"{where}: unknown marker type {kind} ({sectors} sectors)")
    walk.content_digest = digest.hexdigest() if walk.inflate else ""
