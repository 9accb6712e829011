"""verify-ova against hostile OVAs: a corpus of crafted archives, each refused cleanly and safely.

Every case is made here from the session's real OVA (our writer's descriptor and
streamOptimized disk), altered the way an attacker would. The whole corpus runs in one child
process under resource limits (address space 1 GiB, no file larger than 128 MiB) with its own
HOME, working directory and TMPDIR inside a sandbox; for each case the test asserts:

- a ``VerifyError`` (no other exception, no traceback) with the expected one-line reason;
- nothing written anywhere in the sandbox but the work folder, and the work folder left empty;
  no file at the absolute names the archives aim at;
- memory bounded: the child's peak RSS stays far below the bombs' sizes.

A few cases also go through ``invoke verify-ova --no-boot`` as a subprocess (exit 1, the reason
on one line, no traceback). The must-accept cases are OVAs laid out as VirtualBox 7.2's
``VBoxManage export --manifest`` writes them: manifest last, ``SHA1 (name) = hex`` (OVF 1.0) or
``SHA256 (name) = hex`` (OVF 2.0), GNU tar headers, no end-of-archive blocks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT, ApplianceConfig
from appliance.export import vmdk as vmdk_mod
from appliance.export.ova import write_ova
from appliance.export.vmdk import (
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_VALID_NEWLINE_TEST,
    GD_AT_END,
    GRAIN,
    GRAIN_SECTORS,
    GT_BYTES,
    GT_ENTRIES,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    SECTOR,
    descriptor_text,
    write_stream_vmdk,
)
from appliance.run import run

OVF, MF, VMDK = "csghub-test.ovf", "csghub-test.mf", "csghub-test-disk001.vmdk"
EVIL = "evil.vmdk"  # the unchecked disk an ambiguous OVA smuggles in
# Absolute paths the archives aim at; none may exist after the run.
PWNED = f"/tmp/csghub-verify-pwned-{uuid.uuid4().hex[:8]}"


# -- building archives ----------------------------------------------------------------------------


@dataclass
class Member:
    name: str | bytes
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # the header's size when it differs from len(data) (the data is then a hole)
    fmt: int = tarfile.USTAR_FORMAT


def header(m: Member) -> bytes:
    info = tarfile.TarInfo("placeholder")
    info.size = len(m.data) if m.size is None else m.size
    info.type = m.type
    info.linkname = m.linkname
    info.mode = 0o644
    info.mtime = 0
    if m.type in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE):
        info.size = 0
    raw = info.tobuf(m.fmt, "utf-8", "surrogateescape")
    name = m.name.encode("utf-8", "surrogateescape") if isinstance(m.name, str) else m.name
    block = bytearray(raw[:512])
    block[0:100] = name.ljust(100, b"\0")[:100]
    return fix_checksum(block)


def fix_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def write_tar(path: Path, members: list[Member], *, end: bool = True) -> Path:
    """Members one after another (a declared size beyond the data becomes a hole: sparse)."""
    with path.open("wb") as f:
        for m in members:
            f.write(header(m))
            size = len(m.data) if m.size is None else m.size
            if m.type in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE):
                size = 0
            f.write(m.data)
            f.seek(size - len(m.data) + (-size % 512), os.SEEK_CUR)
        if end:
            f.write(b"\0" * 1024)
        f.truncate()
    return path


def sha(data: bytes, algo: str = "sha256") -> str:
    return hashlib.new(algo, data).hexdigest()


def mf(entries: dict[str, bytes], style: str = "SHA256({})= {}") -> bytes:
    algo = "sha1" if style.startswith("SHA1") else "sha256"
    return "".join(style.format(n, sha(d, algo)) + "\n" for n, d in entries.items()).encode()


@dataclass(frozen=True)
class Parts:
    ovf: bytes
    vmdk: bytes
    ovf20: bytes
    vmdk20: bytes
    evil: bytes = b""  # a sound streamOptimized VMDK (extent "evil.vmdk") of the same size, other content


def sound(p: Parts, ovf: bytes | None = None, vmdk: bytes | None = None, *, vmdk_name: str = VMDK) -> list[Member]:
    """The three members of a sound OVA, with a manifest matching whatever descriptor/disk is given."""
    o, d = ovf if ovf is not None else p.ovf, vmdk if vmdk is not None else p.vmdk
    return [Member(OVF, o), Member(MF, mf({OVF: o, vmdk_name: d})), Member(vmdk_name, d)]


def with_href(p: Parts, href: str) -> bytes:
    return p.ovf.replace(f'ovf:href="{VMDK}"'.encode(), f'ovf:href="{href}"'.encode())


def with_disk_attr(p: Parts, attr: str, value: str) -> bytes:
    return re.sub(rf'ovf:{attr}="[^"]*"'.encode(), f'ovf:{attr}="{value}"'.encode(), p.ovf, count=1)


def inject_doctype(p: Parts, doctype: str, entity_use: str) -> bytes:
    body = p.ovf.split(b"?>", 1)[1] if p.ovf.startswith(b"<?xml") else p.ovf
    body = body.replace(b"<Info>", f"<Info>{entity_use}".encode(), 1)
    return b'<?xml version="1.0"?>\n' + doctype.encode() + body


BILLION_LAUGHS = ('<!DOCTYPE Envelope [<!ENTITY a "ha"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                  '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">'
                  '<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">'
                  '<!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;"><!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">'
                  '<!ENTITY i "&h;&h;&h;&h;&h;&h;&h;&h;&h;&h;">]>\n')


def negative_size_header(name: str) -> bytes:
    block = bytearray(header(Member(name, b"")))
    block[124:136] = b"\xff" * 12  # base-256, sign bit set: -1
    return fix_checksum(block)


def descriptor_vmdk() -> bytes:
    """A text-descriptor VMDK whose extent is a host file: what qemu would read into the guest."""
    return (b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n"
            b"RW 8 FLAT \"/etc/passwd\" 0\n" + b"\n" * 100)


# Each case: (id, build(parts, dest) -> Path, a substring every run must find in the reasons).
Builder = Callable[[Parts, Path], Path]
CASES: list[tuple[str, Builder, str]] = []


def case(case_id: str, expected: str) -> Callable[[Builder], Builder]:
    def add(fn: Builder) -> Builder:
        CASES.append((case_id, fn, expected))
        return fn
    return add


@case("traversal", "'../evil.vmdk': not a plain file name (it has a directory part)")
def _(p: Parts, d: Path) -> Path:
    o = with_href(p, "../evil.vmdk")
    return write_tar(d, sound(p, o, vmdk_name="../evil.vmdk"))


@case("absolute-name", "not a plain file name (it has a directory part)")
def _(p: Parts, d: Path) -> Path:
    o = with_href(p, PWNED)
    return write_tar(d, sound(p, o, vmdk_name=PWNED))


@case("href-dot", "References: href '.' is not a plain file name (it names a directory)")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, sound(p, with_href(p, ".")))


@case("href-subdir", "References: href 'nosuchdir/disk.vmdk' is not a plain file name")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, sound(p, with_href(p, "nosuchdir/disk.vmdk")))


@case("symlink", f"tar member {VMDK!r}: is a symbolic link (to '/etc/passwd'), not a regular file")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p)[:2], Member(VMDK, type=tarfile.SYMTYPE, linkname="/etc/passwd")])


@case("hardlink", "is a hard link (to '/root/.ssh/authorized_keys'), not a regular file")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p)[:2], Member(VMDK, type=tarfile.LNKTYPE, linkname="/root/.ssh/authorized_keys")])


@case("device", "is a character device, not a regular file")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p)[:2], Member(VMDK, type=tarfile.CHRTYPE)])


@case("fifo", "is a FIFO, not a regular file")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p)[:2], Member(VMDK, type=tarfile.FIFOTYPE)])


@case("directory", "is a directory, not a regular file")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p), Member("x/", type=tarfile.DIRTYPE)])


@case("duplicate-name", f"tar member {VMDK!r} appears twice")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p), Member(VMDK, b"second copy")])


@case("sparse-ovf-3GiB", "(a sparse-file bomb); not read")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [Member(OVF, p.ovf[:100], size=3 << 30), *sound(p)[1:]])


@case("sparse-disk-1GiB", "(a sparse-file bomb); not read")
def _(p: Parts, d: Path) -> Path:
    o = with_disk_attr(p, "size", str(1 << 30))
    return write_tar(d, [Member(OVF, o), Member(MF, mf({OVF: o, VMDK: bytes(1 << 30)})),
                         Member(VMDK, b"KDMV", size=1 << 30)])


@case("huge-declared-size", "is not a decimal number of at most 20 digits")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, sound(p, with_disk_attr(p, "size", "9" * 5000)))


@case("declared-size-mismatch", "descriptor says 12 bytes, archive holds")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, sound(p, with_disk_attr(p, "size", "12")))


@case("unit-bomb", "capacityAllocationUnits 'byte * 2^40000000000'")
def _(p: Parts, d: Path) -> Path:
    o = p.ovf.replace(b'ovf:capacity=', b'ovf:capacityAllocationUnits="byte * 2^40000000000" ovf:capacity=', 1)
    return write_tar(d, sound(p, o))


@case("capacity-5000-digits", "disk capacity")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, sound(p, with_disk_attr(p, "capacity", "7" * 5000)))


@case("billion-laughs", "refused XML: it declares a DTD")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, sound(p, inject_doctype(p, BILLION_LAUGHS, "&i;")))


@case("external-entity", "refused XML: it declares a DTD")
def _(p: Parts, d: Path) -> Path:
    doctype = '<!DOCTYPE Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
    return write_tar(d, sound(p, inject_doctype(p, doctype, "&x;")))


@case("missing-disk", f"{VMDK!r} is listed in References but missing from the archive")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, sound(p)[:2])


@case("extra-member", "tar member 'notes.txt' is not listed in the descriptor's References")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p), Member("notes.txt", b"hello\n")])


@case("ovf-not-first", f"first member is {MF!r}; an OVA must start with its .ovf descriptor")
def _(p: Parts, d: Path) -> Path:
    s = sound(p)
    return write_tar(d, [s[1], s[0], s[2]])


@case("malformed-manifest", "manifest line 1 is not 'SHA256(name)= hex'")
def _(p: Parts, d: Path) -> Path:
    s = sound(p)
    s[1].data = s[1].data.replace(b"SHA256(", b"MD5(", 1)
    return write_tar(d, s)


@case("manifest-path", "manifest line 3: '../../etc/passwd' is not a plain file name")
def _(p: Parts, d: Path) -> Path:
    s = sound(p)
    s[1].data += f"SHA256(../../etc/passwd)= {'0' * 64}\n".encode()
    return write_tar(d, s)


@case("non-utf8-name", "not a plain file name (it is not UTF-8)")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p), Member(b"disk\xff\xfe.vmdk", b"x")])


@case("control-char-name", "not a plain file name (it holds control characters)")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p), Member("evil\x1b[2J.vmdk", b"x")])


@case("truncated-data", "run past the archive's end (truncated)")
def _(p: Parts, d: Path) -> Path:
    write_tar(d, sound(p), end=False)
    with d.open("r+b") as f:
        f.truncate(d.stat().st_size - 700)
    return d


@case("truncated-header", "archive ends inside a header")
def _(p: Parts, d: Path) -> Path:
    write_tar(d, sound(p)[:2], end=False)
    with d.open("ab") as f:
        f.write(header(Member(VMDK, p.vmdk))[:300])
    return d


@case("pax-header", "PAX extended header, which VirtualBox cannot import")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [Member("pax", b"30 path=../../../tmp/pwned-pax\n", type=tarfile.XHDTYPE), *sound(p)])


@case("sparse-pax-3GiB", "PAX extended header, which VirtualBox cannot import")
def _(p: Parts, d: Path) -> Path:
    # Why the walk over the headers is ours and not TarFile.next(): tarfile reads a PAX (or GNU
    # long-name) member's data whole into memory, by its declared size, to apply it to the next
    # header. Under this test's 1 GiB address-space cap that is a MemoryError; our walk seeks over it.
    return write_tar(d, [Member("pax", b"30 path=../../../tmp/pwned-pax\n", type=tarfile.XHDTYPE, size=3 << 30),
                         *sound(p)])


@case("gnu-longname", "GNU long-name header; OVA member names must fit ustar")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p), Member("././@LongLink", b"../" * 60 + b"x\0", type=tarfile.GNUTYPE_LONGNAME)])


@case("bad-checksum", "checksum mismatch (damaged header, or not a tar archive)")
def _(p: Parts, d: Path) -> Path:
    write_tar(d, sound(p))
    with d.open("r+b") as f:
        f.seek(50)
        f.write(b"X")
    return d


@case("negative-size", "tar member 'csghub-test.ovf': negative size field")
def _(p: Parts, d: Path) -> Path:
    with d.open("wb") as f:
        f.write(negative_size_header(OVF) + b"\0" * 1024)
    return d


@case("descriptor-vmdk", "not a sparse VMDK (no 'KDMV' header)")
def _(p: Parts, d: Path) -> Path:
    v = descriptor_vmdk()
    return write_tar(d, sound(p, with_disk_attr(p, "size", str(len(v))), v))


@case("altered-disk", f"{VMDK}: SHA256 digest differs from the manifest (damaged or altered)")
def _(p: Parts, d: Path) -> Path:
    s = sound(p)
    s[2].data = s[2].data[:-1] + bytes([s[2].data[-1] ^ 1])
    return write_tar(d, s)


@case("two-descriptors", "the archive holds 2 .ovf descriptors; an OVA holds one")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p), Member("other.ovf", p.ovf)])


@case("big-manifest", "manifest 'csghub-test.mf' is 2097152 bytes; more than the 1048576 allowed")
def _(p: Parts, d: Path) -> Path:
    s = sound(p)
    s[1].data = s[1].data.ljust(2 << 20, b"\n")
    return write_tar(d, s)


@case("big-descriptor", "descriptor 'csghub-test.ovf' is 5242880 bytes; more than the 4194304 allowed")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, sound(p, p.ovf.ljust(5 << 20, b" ")))


@case("too-many-members", "more than 64 members")
def _(p: Parts, d: Path) -> Path:
    return write_tar(d, [*sound(p), *(Member(f"m{i}", b"x") for i in range(70))])


@case("empty-archive", "the archive holds no members (not an OVA)")
def _(p: Parts, d: Path) -> Path:
    d.write_bytes(b"\0" * 10240)
    return d


@case("not-a-tar", "(damaged header, or not a tar archive)")
def _(p: Parts, d: Path) -> Path:
    d.write_bytes(hashlib.sha512(b"noise").digest() * 64)
    return d


@case("deep-nesting", "descriptor")
def _(p: Parts, d: Path) -> Path:
    deep = b"<a>" * 200_000 + b"</a>" * 200_000
    o = p.ovf.replace(b"</Envelope>", deep + b"</Envelope>") if b"</Envelope>" in p.ovf else p.ovf
    o = o.replace(b"</ovf:Envelope>", deep + b"</ovf:Envelope>")
    return write_tar(d, sound(p, o))


@case("flat-tag-flood", "tags; more than the 20000 allowed (not parsed)")
def _(p: Parts, d: Path) -> Path:
    # Within the 4 MiB byte cap, a million tiny elements: parsed, 1.2 GB of memory and 40 s of schema work.
    flood = b"<x/>" * ((4 << 20) // 4 - len(p.ovf) // 4 - 64)
    return write_tar(d, sound(p, p.ovf.replace(b"</Envelope>", flood + b"</Envelope>")))


# -- two readers, two disks (issue 21) ------------------------------------------------------------
# Each OVA below is sound but for one ambiguity through which VirtualBox 7.2's importer (or QEMU)
# would take EVIL, an unchecked disk, where our reader takes the checked one. The vbox tier's
# differential test (tests/vbox/test_vbox_differential.py) imports each with the real VirtualBox
# and records which disk it got.

FILE_ELEMENT = re.compile(rb"<File [^>]*/>")
DISK_ELEMENT = re.compile(rb"<Disk [^>]*/>")


def evil_file(p: Parts, file_id: str = "file2", extra: str = "") -> bytes:
    return f'<File {extra}ovf:id="{file_id}" ovf:href="{EVIL}" ovf:size="{len(p.evil)}"/>'.encode()


def evil_disk(p: Parts, tag: str = "Disk", extra: str = "") -> bytes:
    real = DISK_ELEMENT.search(p.ovf)
    assert real
    return (real.group(0).replace(b"<Disk ", f"<{tag} {extra}".encode(), 1)
            .replace(b'ovf:fileRef="file1"', b'ovf:fileRef="file2"'))


def ova_of(d: Path, ovf: bytes, files: list[tuple[str, bytes]], manifest: bytes | None = None) -> Path:
    """The descriptor, a manifest of every member (unless given), then the files in the order given."""
    listed = mf({OVF: ovf, **dict(files)}) if manifest is None else manifest
    return write_tar(d, [Member(OVF, ovf), Member(MF, listed), *(Member(n, b) for n, b in files)])


def references_plus_evil(p: Parts, ovf: bytes | None = None) -> bytes:
    """The descriptor with EVIL listed as file2 after the real file."""
    o = p.ovf if ovf is None else ovf
    real = FILE_ELEMENT.search(o)
    assert real
    return o.replace(real.group(0), real.group(0) + evil_file(p), 1)


def before_element(ovf: bytes, end_tag: bytes, insert: bytes) -> bytes:
    assert end_tag in ovf
    return ovf.replace(end_tag, insert + end_tag, 1)


@case("duplicate-file-id", "File id 'file1' is used twice")
def _(p: Parts, d: Path) -> Path:
    real = FILE_ELEMENT.search(p.ovf)
    assert real
    o = p.ovf.replace(real.group(0), evil_file(p, "file1") + real.group(0), 1)
    return ova_of(d, o, [(EVIL, p.evil), (VMDK, p.vmdk)])


@case("shadowing-href-foreign-namespace", "File attribute '{urn:x}href' shadows ovf:href")
def _(p: Parts, d: Path) -> Path:
    o = p.ovf.replace(b"<File ", f'<File xmlns:x="urn:x" x:href="{EVIL}" '.encode(), 1)
    return ova_of(d, o, [(VMDK, p.vmdk), (EVIL, p.evil)])


@case("shadowing-href-no-namespace", "File attribute 'href' shadows ovf:href")
def _(p: Parts, d: Path) -> Path:
    o = p.ovf.replace(b"<File ", f'<File href="{EVIL}" '.encode(), 1)
    return ova_of(d, o, [(VMDK, p.vmdk), (EVIL, p.evil)])


@case("shadowing-id-no-namespace", "File attribute 'id' shadows ovf:id")
def _(p: Parts, d: Path) -> Path:
    real = FILE_ELEMENT.search(p.ovf)
    assert real
    o = p.ovf.replace(real.group(0), evil_file(p, "file9", 'id="file1" ') + real.group(0), 1)
    return ova_of(d, o, [(EVIL, p.evil), (VMDK, p.vmdk)])


@case("duplicate-disk-id", "disk id 'vmdisk1' is used twice")
def _(p: Parts, d: Path) -> Path:
    o = before_element(references_plus_evil(p), b"</DiskSection>", evil_disk(p))
    return ova_of(d, o, [(VMDK, p.vmdk), (EVIL, p.evil)])


@case("disk-in-collection", "a VirtualSystemCollection (in the Envelope)")
def _(p: Parts, d: Path) -> Path:
    collection = (b'<VirtualSystemCollection ovf:id="more"><Info>more</Info><DiskSection><Info>disks</Info>'
                  + evil_disk(p) + b"</DiskSection></VirtualSystemCollection>")
    o = before_element(references_plus_evil(p), b"</Envelope>", collection)
    return ova_of(d, o, [(VMDK, p.vmdk), (EVIL, p.evil)])


@case("disksection-foreign-namespace", "a DiskSection element outside the OVF namespace")
def _(p: Parts, d: Path) -> Path:
    section = (b'<x:DiskSection xmlns:x="urn:x"><x:Info>disks</x:Info>' + evil_disk(p, "x:Disk")
               + b"</x:DiskSection>")
    o = references_plus_evil(p)
    o = o.replace(b"</DiskSection>", b"</DiskSection>" + section, 1)
    return ova_of(d, o, [(VMDK, p.vmdk), (EVIL, p.evil)])


@case("ovf09-disk-section", "an OVF 0.9 <Section> element (in the Envelope)")
def _(p: Parts, d: Path) -> Path:
    section = b'<Section xsi:type="ovf:DiskSection_Type"><Info>disks</Info>' + evil_disk(p) + b"</Section>"
    o = references_plus_evil(p)
    o = o.replace(b"</DiskSection>", b"</DiskSection>" + section, 1)
    return ova_of(d, o, [(VMDK, p.vmdk), (EVIL, p.evil)])


@case("disk-foreign-namespace", "a Disk element outside the OVF namespace")
def _(p: Parts, d: Path) -> Path:
    o = before_element(references_plus_evil(p), b"</DiskSection>", evil_disk(p, "x:Disk", 'xmlns:x="urn:x" '))
    return ova_of(d, o, [(VMDK, p.vmdk), (EVIL, p.evil)])


@case("references-non-file-child", "References holds <Blob>")
def _(p: Parts, d: Path) -> Path:
    blob = f'<x:Blob xmlns:x="urn:x" ovf:id="file1" ovf:href="{EVIL}"/>'.encode()
    o = p.ovf.replace(b"<References>", b"<References>" + blob, 1)
    return ova_of(d, o, [(EVIL, p.evil), (VMDK, p.vmdk)])


@case("two-references", "2 References elements: VirtualBox reads only the first")
def _(p: Parts, d: Path) -> Path:
    first = b"<References>" + evil_file(p, "file1") + b"</References>"
    o = p.ovf.replace(b"<References>", first + b"<References>", 1)
    return ova_of(d, o, [(EVIL, p.evil), (VMDK, p.vmdk)])


@case("gzip-compression", "File attribute 'ovf:compression' is not one both readers read the same way")
def _(p: Parts, d: Path) -> Path:
    import gzip

    packed = gzip.compress(p.evil, mtime=0)
    o = with_disk_attr(p, "size", str(len(packed))).replace(b"<File ", b'<File ovf:compression="gzip" ', 1)
    return ova_of(d, o, [(VMDK, packed)])


@case("chunked-file", "File attribute 'ovf:chunkSize' is not one both readers read the same way")
def _(p: Parts, d: Path) -> Path:
    o = p.ovf.replace(b"<File ", b'<File ovf:chunkSize="65536" ', 1)
    return ova_of(d, o, [(VMDK, p.vmdk)])


@case("disk-parent-ref", "Disk attribute 'ovf:parentRef' is not one both readers read the same way")
def _(p: Parts, d: Path) -> Path:
    o = p.ovf.replace(b"<Disk ", b'<Disk ovf:parentRef="vmdisk0" ', 1)
    return ova_of(d, o, [(VMDK, p.vmdk)])


@case("empty-manifest", "manifest csghub-test.mf is empty")
def _(p: Parts, d: Path) -> Path:
    o = with_disk_attr(p, "size", str(len(p.evil)))
    return ova_of(d, o, [(VMDK, p.evil)], manifest=b"")


@case("whitespace-manifest", "manifest csghub-test.mf is empty")
def _(p: Parts, d: Path) -> Path:
    o = with_disk_attr(p, "size", str(len(p.evil)))
    return ova_of(d, o, [(VMDK, p.evil)], manifest=b" \n\t\n  \n")


@case("manifest-without-descriptor", f"tar member {OVF!r} has no digest in the manifest")
def _(p: Parts, d: Path) -> Path:
    return ova_of(d, p.ovf, [(VMDK, p.vmdk)], manifest=mf({VMDK: p.vmdk}))


@case("hex-size", "is not a decimal number of at most 20 digits")
def _(p: Parts, d: Path) -> Path:
    return ova_of(d, with_disk_attr(p, "size", hex(len(p.vmdk))), [(VMDK, p.vmdk)])


@case("octal-capacity", "disk capacity '067108864' is not a decimal number")
def _(p: Parts, d: Path) -> Path:
    return ova_of(d, with_disk_attr(p, "capacity", "067108864"), [(VMDK, p.vmdk)])


@case("case-twin-member", "differ only in case")
def _(p: Parts, d: Path) -> Path:
    return ova_of(d, p.ovf, [(VMDK.upper(), p.evil), (VMDK, p.vmdk)])


@case("href-looks-like-a-manifest", "differs from the descriptor's or manifest's name only in case")
def _(p: Parts, d: Path) -> Path:
    # Before the real manifest, VirtualBox reads this empty one as the manifest (base name matched
    # without case, first one wins): no digest is checked.
    shadow = "csghub-test.MF"
    o = references_plus_evil(p).replace(f'ovf:href="{EVIL}" ovf:size="{len(p.evil)}"'.encode(),
                                        f'ovf:href="{shadow}" ovf:size="0"'.encode())
    return ova_of(d, o, [(VMDK, p.vmdk), (shadow, b"")])


@case("href-looks-like-a-signature", "VirtualBox reads a member ending in .ovf, .mf or .cert")
def _(p: Parts, d: Path) -> Path:
    shadow = "csghub-test.cert"
    o = references_plus_evil(p).replace(f'ovf:href="{EVIL}" ovf:size="{len(p.evil)}"'.encode(),
                                        f'ovf:href="{shadow}" ovf:size="4"'.encode())
    return ova_of(d, o, [(VMDK, p.vmdk), (shadow, b"sig\n")])


@case("href-with-parentheses", "a manifest line 'SHA256(name)= hex' cannot hold it unambiguously")
def _(p: Parts, d: Path) -> Path:
    name = "disk(1).vmdk"
    return ova_of(d, with_href(p, name), [(name, p.vmdk)])


# -- VMDKs two readers read differently (issue 21) ------------------------------------------------
# VirtualBox's OVA import reads a streamOptimized VMDK by its markers, in stream order; QEMU by the
# footer's grain directory and the grain tables. Each VMDK below is laid out as our writer (and
# VirtualBox) lays it out, header and descriptor padded to a whole grain, except for the one
# thing the case is about.

GOOD_GRAIN = b"GOOD" * (GRAIN // 4)
EVIL_GRAIN = b"EVIL" * (GRAIN // 4)
CAPACITY = 64 << 20


@dataclass
class VmdkLayout:
    """A streamOptimized VMDK before serialisation; cases change fields, ``bytes()`` writes it."""

    grains: list[tuple[int, bytes]]  # (LBA, the 64 KiB grain), in stream order
    capacity: int = CAPACITY // SECTOR  # sectors (header and footer)
    descriptor: bytes = b""
    flags: int = FLAG_VALID_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS
    header_gd: int = GD_AT_END
    tables: dict[int, list[int]] | None = None  # None: made from the grains; else index -> 512 entries
    directory: list[int] | None = None  # None: made from the tables
    footer_gd: int | None = None
    inflated_size: int = GRAIN  # how much of each grain is deflated (a short grain below GRAIN)
    extra_marker: bytes = b""  # a metadata marker (and data) written right before the grain directory
    tail: bytes = b""  # bytes after the end-of-stream marker

    def serialize(self, name: str = VMDK) -> bytes:
        desc = self.descriptor or descriptor_text(name, self.capacity)
        desc_sectors = -(-len(desc) // SECTOR)
        overhead = vmdk_mod._overhead(desc_sectors)

        def header(gd: int) -> bytes:
            raw = bytearray(vmdk_mod._header(self.capacity, desc_sectors, gd))
            raw[8:12] = struct.pack("<I", self.flags)
            return bytes(raw)

        out = bytearray(header(self.header_gd) + desc.ljust((overhead - 1) * SECTOR, b"\0"))
        made: dict[int, list[int]] = {}
        span = GRAIN_SECTORS * GT_ENTRIES
        places: dict[int, int] = {}  # table index -> the sector its entries are written at
        for number, (lba, grain) in enumerate(self.grains):
            index = lba // span
            made.setdefault(index, [0] * GT_ENTRIES)[(lba // GRAIN_SECTORS) % GT_ENTRIES] = len(out) // SECTOR
            out += vmdk_mod._grain_record(lba, zlib.compress(grain[:self.inflated_size]))
            if number + 1 == len(self.grains) or self.grains[number + 1][0] // span != index:
                out += vmdk_mod._marker(GT_BYTES // SECTOR, MARKER_GT)  # the table after its span's grains
                places[index] = len(out) // SECTOR
                out += bytes(GT_BYTES)
        for index, entries in (made if self.tables is None else self.tables).items():
            at = places[index] * SECTOR
            out[at:at + GT_BYTES] = struct.pack(f"<{GT_ENTRIES}I", *entries)
        out += self.extra_marker
        gd_entries = -(-self.capacity // span)
        directory = self.directory if self.directory is not None else [places.get(i, 0) for i in range(gd_entries)]
        gd_sectors = -(-gd_entries * 4 // SECTOR)
        out += vmdk_mod._marker(gd_sectors, MARKER_GD)
        gd_at = len(out) // SECTOR
        out += struct.pack(f"<{gd_entries}I", *directory).ljust(gd_sectors * SECTOR, b"\0")
        out += vmdk_mod._marker(1, MARKER_FOOTER) + header(gd_at if self.footer_gd is None else self.footer_gd)
        out += vmdk_mod._marker(0, MARKER_EOS) + self.tail
        return bytes(out)


def two_grains() -> VmdkLayout:
    return VmdkLayout([(0, GOOD_GRAIN), (GRAIN_SECTORS, EVIL_GRAIN)])


def sound_table(layout: VmdkLayout) -> list[int]:
    """The first grain table of ``layout`` as the writer makes it."""
    sound = layout.serialize()
    at = sound.index(vmdk_mod._marker(GT_BYTES // SECTOR, MARKER_GT)) + SECTOR
    return list(struct.unpack_from(f"<{GT_ENTRIES}I", sound, at))


def vmdk_case(case_id: str, expected: str) -> Callable[[Callable[[], bytes]], Callable[[], bytes]]:
    """A case whose OVA is sound around the VMDK the function returns (size, capacity, manifest)."""
    def add(make: Callable[[], bytes]) -> Callable[[], bytes]:
        def build(p: Parts, d: Path) -> Path:
            disk = make()
            return ova_of(d, with_disk_attr(p, "size", str(len(disk))), [(VMDK, disk)])
        CASES.append((case_id, build, expected))
        VMDK_CASES[case_id] = make
        return make
    return add


VMDK_CASES: dict[str, Callable[[], bytes]] = {}


@vmdk_case("vmdk-grain-table-marker-split", "disagree (QEMU reads through the table, VirtualBox the markers)")
def _() -> bytes:
    layout = two_grains()
    table = sound_table(layout)
    table[0], table[1] = table[1], table[0]  # QEMU reads EVIL at LBA 0 and GOOD at 128, VirtualBox the reverse
    layout.tables = {0: table}
    return layout.serialize()


@vmdk_case("vmdk-directory-past-eof", "grain directory at byte")
def _() -> bytes:
    layout = two_grains()
    layout.directory = [1 << 30] + [0] * (CAPACITY // (GRAIN * GT_ENTRIES) - 1)
    return layout.serialize()


@vmdk_case("vmdk-capacity-zero-fifo", "capacity 0; QEMU then opens the extents")
def _() -> bytes:
    layout = two_grains()
    layout.capacity = 0
    layout.descriptor = (b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                         b'createType="monolithicFlat"\n' + f'RW 131072 FLAT "{PWNED}.fifo" 0\n'.encode())
    return layout.serialize()


@vmdk_case("vmdk-extent-names-host-file", "names the extent '/etc/passwd', not the file itself")
def _() -> bytes:
    layout = two_grains()
    layout.descriptor = descriptor_text(VMDK, CAPACITY // SECTOR).replace(f'"{VMDK}"'.encode(), b'"/etc/passwd"')
    return layout.serialize()


@vmdk_case("vmdk-two-extents", "names 2 extents; one, the file itself, is allowed")
def _() -> bytes:
    layout = two_grains()
    text = descriptor_text(VMDK, CAPACITY // SECTOR)
    line = f'RW {CAPACITY // SECTOR} SPARSE "{VMDK}"\n'.encode()
    layout.descriptor = text.replace(line, line + line)
    return layout.serialize()


@vmdk_case("vmdk-flat-extent", "names an extent other than one SPARSE file")
def _() -> bytes:
    layout = two_grains()
    text = descriptor_text(VMDK, CAPACITY // SECTOR)
    line = f'RW {CAPACITY // SECTOR} SPARSE "{VMDK}"\n'.encode()
    layout.descriptor = text.replace(line, line + b'RW 128 FLAT "/etc/shadow" 0\n')
    return layout.serialize()


@vmdk_case("vmdk-parent-file-hint", "names a parent file '/etc/passwd'")
def _() -> bytes:
    layout = two_grains()
    layout.descriptor = descriptor_text(VMDK, CAPACITY // SECTOR).replace(
        b"parentCID=ffffffff\n", b'parentCID=ffffffff\nparentFileNameHint="/etc/passwd"\n')
    return layout.serialize()


@vmdk_case("vmdk-parent-cid", "names a parent disk (parentCID=12345678)")
def _() -> bytes:
    layout = two_grains()
    layout.descriptor = descriptor_text(VMDK, CAPACITY // SECTOR).replace(b"parentCID=ffffffff",
                                                                          b"parentCID=12345678")
    return layout.serialize()


@vmdk_case("vmdk-grains-out-of-order", "grains must come in increasing order")
def _() -> bytes:
    return VmdkLayout([(GRAIN_SECTORS, EVIL_GRAIN), (0, GOOD_GRAIN)]).serialize()


@vmdk_case("vmdk-grain-not-in-table", "disagree (QEMU reads through the table, VirtualBox the markers)")
def _() -> bytes:
    layout = two_grains()
    table = sound_table(layout)
    table[1] = 0  # VirtualBox writes EVIL at LBA 128, QEMU reads zeros there
    layout.tables = {0: table}
    return layout.serialize()


@vmdk_case("vmdk-table-points-at-descriptor", "disagree (QEMU reads through the table, VirtualBox the markers)")
def _() -> bytes:
    layout = two_grains()
    table = sound_table(layout)
    table[2] = 1  # a grain QEMU would read from the descriptor's sector
    layout.tables = {0: table}
    return layout.serialize()


@vmdk_case("vmdk-footer-names-another-directory", "the grain directory is at sector")
def _() -> bytes:
    layout = two_grains()
    layout.footer_gd = 3
    return layout.serialize()


@vmdk_case("vmdk-short-grain", "is not exactly one deflated 65536-byte grain")
def _() -> bytes:
    layout = two_grains()
    layout.inflated_size = 4096
    return layout.serialize()


@vmdk_case("vmdk-bytes-after-end", "bytes after the end-of-stream marker")
def _() -> bytes:
    layout = two_grains()
    layout.tail = vmdk_mod._grain_record(2 * GRAIN_SECTORS, zlib.compress(EVIL_GRAIN))
    return layout.serialize()


@vmdk_case("vmdk-unknown-marker", "unknown marker type 4")
def _() -> bytes:
    layout = two_grains()
    layout.extra_marker = vmdk_mod._marker(1, 4) + bytes(SECTOR)
    return layout.serialize()


@vmdk_case("vmdk-grain-beyond-capacity", "is not a grain inside the capacity")
def _() -> bytes:
    return VmdkLayout([(0, GOOD_GRAIN), (CAPACITY // SECTOR, EVIL_GRAIN)]).serialize()


@vmdk_case("vmdk-header-directory-into-descriptor", "and the grain tables disagree")
def _() -> bytes:
    # A grain directory "in the header" (QEMU's layout) that is really the descriptor's text.
    layout = two_grains()
    layout.header_gd = 3
    return layout.serialize()


@vmdk_case("vmdk-zeroed-grain-table-flag", "flags 0x30005")
def _() -> bytes:
    layout = two_grains()
    layout.flags |= 1 << 2
    return layout.serialize()


@vmdk_case("vmdk-descriptor-capacity-differs", "extent has 262144 sectors, the header 131072")
def _() -> bytes:
    layout = two_grains()
    layout.descriptor = descriptor_text(VMDK, 2 * CAPACITY // SECTOR)
    return layout.serialize()


def test_the_vmdk_builder_makes_what_both_readers_accept(tmp_path: Path) -> None:
    """The crafted VMDKs differ from a sound one only in their case: the sound one passes the walk
    and qemu-img reads GOOD then EVIL from it."""
    from appliance.verify_vmdk import raw_content_digest, walk_stream_vmdk

    disk = tmp_path / VMDK
    disk.write_bytes(two_grains().serialize())
    walk = walk_stream_vmdk(disk, VMDK)
    assert walk.problems == [] and walk.grains == 2 and walk.capacity == CAPACITY
    raw = tmp_path / "disk.raw"
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(disk), str(raw)])
    data = raw.read_bytes()
    assert data[:GRAIN] == GOOD_GRAIN and data[GRAIN:2 * GRAIN] == EVIL_GRAIN and not any(data[2 * GRAIN:])
    with raw.open("rb") as f:
        assert raw_content_digest(f, CAPACITY) == walk.content_digest


def virtualbox_ovf20_dialect(ovf20: bytes) -> bytes:
    """Our OVF 2.0 descriptor as VirtualBox writes OVF 2.0: sasd/epasd namespaces with a '.xsd' suffix,
    Items without ElementName, the EthernetPortItem after the StorageItem (../shared/ovf/README.md)."""
    text = ovf20.decode()
    for cls in ("CIM_StorageAllocationSettingData", "CIM_EthernetPortAllocationSettingData"):
        text = text.replace(f'{cls}"', f'{cls}.xsd"')
    text = re.sub(r"\n *<(rasd|sasd|epasd):ElementName>[^<]*</\1:ElementName>", "", text)
    port = re.search(r"\n *<EthernetPortItem>.*?</EthernetPortItem>", text, re.S)
    storage = re.search(r"\n *<StorageItem>.*?</StorageItem>", text, re.S)
    assert port and storage and port.start() < storage.start()
    text = text[:port.start()] + storage.group(0) + port.group(0) + text[storage.end():]
    return text.encode()


# VirtualBox 7.2's own layout: valid by definition.
ACCEPT: list[tuple[str, Callable[[Parts, Path], Path]]] = [
    ("vbox-ovf10-sha1-mf-last-gnu-no-eoa", lambda p, d: write_tar(d, [
        Member(OVF, p.ovf, fmt=tarfile.GNU_FORMAT), Member(VMDK, p.vmdk, fmt=tarfile.GNU_FORMAT),
        Member(MF, mf({OVF: p.ovf, VMDK: p.vmdk}, "SHA1 ({}) = {}"), fmt=tarfile.GNU_FORMAT)], end=False)),
    ("vbox-ovf20-sha256-mf-last-no-eoa", lambda p, d: write_tar(d, [
        Member(OVF, p.ovf20), Member(VMDK, p.vmdk20),
        Member(MF, mf({OVF: p.ovf20, VMDK: p.vmdk20}, "SHA256 ({}) = {}"))], end=False)),
    ("ovftool-style-mf-second", lambda p, d: write_tar(d, sound(p))),
    ("vbox-ovf20-dialect", lambda p, d: write_tar(d, [
        Member(OVF, virtualbox_ovf20_dialect(p.ovf20)), Member(VMDK, p.vmdk20),
        Member(MF, mf({OVF: virtualbox_ovf20_dialect(p.ovf20), VMDK: p.vmdk20}, "SHA256 ({}) = {}"))], end=False)),
]


# -- running the corpus -------------------------------------------------------------------------

CHILD = r"""
import json, re, resource, sys, traceback
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
resource.setrlimit(resource.RLIMIT_FSIZE, (128 << 20, 128 << 20))
from appliance.errors import VerifyError
from appliance.verify import verify_ova
jobs = json.loads(sys.argv[1])
out = {}
for job in jobs:
    work = Path(job["work"])
    try:
        verify_ova(Path(job["ova"]), boot=False, schema_dir=Path(job["schemas"]), work_dir=work)
        out[job["id"]] = {"outcome": "accepted"}
    except VerifyError as exc:
        out[job["id"]] = {"outcome": "refused", "reasons": exc.reasons, "message": exc.message}
    except BaseException:
        out[job["id"]] = {"outcome": "crashed", "traceback": traceback.format_exc()}
    out[job["id"]]["work_left"] = sorted(str(q) for q in work.rglob("*"))
# VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss, so a
# big pytest process (the whole suite) would be counted as the verifier's memory.
out["_maxrss_kib"] = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps(out))
"""


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {str(q): (q.stat().st_size, q.stat().st_mtime_ns) for q in root.rglob("*")
            if skip not in q.parents and q != skip}


@pytest.fixture(scope="session")
def parts(built_ova: Path, small_disk: Path, make_cfg: Callable[..., ApplianceConfig],
          tmp_path_factory: pytest.TempPathFactory) -> Parts:
    with tarfile.open(built_ova) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    two = write_ova(small_disk, make_cfg("output.formats={virtualbox-ova-ovf20}"),
                    tmp_path_factory.mktemp("ovf20") / "csghub-test.ova")
    with tarfile.open(two.path) as tar:
        got20 = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    raw = tmp_path_factory.mktemp("evil") / "evil.raw"
    with raw.open("wb") as f:
        f.truncate(64 << 20)
        f.write(b"EVIL" * 128 * 64)  # the first 32 KiB: what a swapped disk would boot
    evil = io.BytesIO()
    write_stream_vmdk(raw, evil, name=EVIL)
    return Parts(got[OVF], got[VMDK], got20[OVF], got20[VMDK], evil.getvalue())


@pytest.fixture(scope="session")
def corpus(parts: Parts, ovf_schema_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    sandbox = tmp_path_factory.mktemp("sandbox")
    for sub in ("ovas", "work", "home", "cwd"):
        (sandbox / sub).mkdir()
    jobs = []
    for case_id, build, _ in CASES:
        build(parts, sandbox / "ovas" / f"{case_id}.ova")
    for case_id, build in ACCEPT:
        build(parts, sandbox / "ovas" / f"{case_id}.ova")
    for case_id in [c[0] for c in CASES] + [a[0] for a in ACCEPT]:
        jobs.append({"id": case_id, "ova": str(sandbox / "ovas" / f"{case_id}.ova"),
                     "work": str(sandbox / "work"), "schemas": str(ovf_schema_dir)})
    before = snapshot(sandbox, sandbox / "work")
    env = {"PATH": os.environ["PATH"], "HOME": str(sandbox / "home"), "TMPDIR": str(sandbox / "work"),
           "PYTHONPATH": str(PROJECT_ROOT), "LANG": "C.UTF-8"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], cwd=sandbox / "cwd", env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    results["_changed"] = sorted(set(snapshot(sandbox, sandbox / "work").items()) ^ set(before.items()))
    results["_stderr"] = proc.stderr
    return results


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("case_id", "expected"), [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_ova_is_refused_cleanly(corpus: dict[str, object], case_id: str, expected: str) -> None:
    result = corpus[case_id]
    assert isinstance(result, dict)
    assert result["outcome"] == "refused", result.get("traceback") or result
    assert any(expected in r for r in result["reasons"]), result["reasons"]
    for reason in result["reasons"]:
        assert "\n" not in reason and len(reason) < 400, reason
        assert "Error:" not in reason.split(":", 1)[0], reason  # a finding, not an exception's repr
    assert result["work_left"] == [], "the work folder must be emptied"


def test_nothing_is_written_outside_the_work_folder_and_memory_stays_bounded(corpus: dict[str, object]) -> None:
    assert corpus["_changed"] == []
    assert not Path(PWNED).exists()
    assert not Path("/tmp/pwned-pax").exists()
    # The bombs claim gigabytes; the whole corpus ran in one process under a 1 GiB address-space cap.
    maxrss_mib = int(corpus["_maxrss_kib"]) / 1024  # type: ignore[call-overload]
    assert maxrss_mib < 300, f"peak RSS {maxrss_mib:.0f} MiB"
    assert "Traceback" not in str(corpus["_stderr"])


@pytest.mark.parametrize("case_id", [a[0] for a in ACCEPT])
def test_virtualbox_layouts_are_accepted(corpus: dict[str, object], case_id: str) -> None:
    result = corpus[case_id]
    assert isinstance(result, dict)
    assert result["outcome"] == "accepted", result
    assert result["work_left"] == []


def test_virtualbox_ovf20_dialect_is_named_not_refused(parts: Parts, ovf_schema_dir: Path, tmp_path: Path) -> None:
    """Its three known deviations are repaired and named in the report; anything else still counts."""
    from appliance.export.ovf import schema_errors
    from appliance.verify import verify_ova

    dialect = virtualbox_ovf20_dialect(parts.ovf20)
    tolerated: list[str] = []
    assert schema_errors(dialect, ovf_schema_dir, tolerated=tolerated) == []
    assert len(tolerated) == 1 and "ElementName" in tolerated[0]
    ova = write_tar(tmp_path / "dialect.ova", [Member(OVF, dialect), Member(VMDK, parts.vmdk20),
                                               Member(MF, mf({OVF: dialect, VMDK: parts.vmdk20}))])
    outcome = dict(verify_ova(ova, boot=False, schema_dir=ovf_schema_dir).checks)["OVF schema"]
    assert outcome.startswith("checked (VirtualBox's known OVF 2.0 deviations repaired")
    broken = dialect.replace(b"<System>", b"<Sys>").replace(b"</System>", b"</Sys>")
    assert schema_errors(broken, ovf_schema_dir) != []


@pytest.mark.parametrize("case_id", ["traversal", "symlink", "billion-laughs", "sparse-ovf-3GiB", "unit-bomb"])
def test_invoke_verify_ova_exits_1_with_a_one_line_reason(parts: Parts, tmp_path: Path, case_id: str) -> None:
    build, expected = next((c[1], c[2]) for c in CASES if c[0] == case_id)
    ova = build(parts, tmp_path / f"{case_id}.ova")
    (tmp_path / "work").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "work"), "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "invoke", "-r", str(PROJECT_ROOT), "verify-ova", str(ova),
                           "--no-boot"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    assert "failed verification" in output
    assert any(line.strip().startswith("- ") and expected in line for line in output.splitlines()), output
    assert list((tmp_path / "work").iterdir()) == []


def test_disks_are_copied_only_into_room_that_exists_and_a_bad_copy_is_deleted(
    parts: Parts, tmp_path: Path, ovf_schema_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance import verify_ova as module

    work = tmp_path / "work"
    work.mkdir()
    good = write_tar(tmp_path / "good.ova", sound(parts))
    result = module.check_structure(good, work, ovf_schema_dir)
    assert result.findings == [] and [p.name for p in work.iterdir()] == ["disk1.vmdk"]
    assert result.extracted[VMDK].read_bytes() == parts.vmdk  # the hashed bytes, under a name made here
    result.extracted[VMDK].unlink()

    s = sound(parts)
    s[2].data = s[2].data[:-1] + bytes([s[2].data[-1] ^ 1])
    altered = write_tar(tmp_path / "altered.ova", s)
    result = module.check_structure(altered, work, ovf_schema_dir)
    assert any("digest differs" in f for f in result.findings)
    assert list(work.iterdir()) == [], "a copy whose digest differs is deleted"

    class Usage:
        free = 10 << 20

    monkeypatch.setattr(module.shutil, "disk_usage", lambda _: Usage())
    result = module.check_structure(good, work, ovf_schema_dir)
    assert any(f.startswith("the disks need") and "which has 10485760 free" in f for f in result.findings)
    assert list(work.iterdir()) == []


def test_publish_recheck_walks_disks_in_place(parts: Parts, tmp_path: Path, ovf_schema_dir: Path) -> None:
    """check_structure(extract=False), publish's re-check: nothing is copied, and each disk's walk
    inside the archive finds what the walk of the extracted copy finds."""
    from appliance.verify_ova import check_structure

    work = tmp_path / "work"
    work.mkdir()
    good = write_tar(tmp_path / "good.ova", sound(parts))
    copied = check_structure(good, work, ovf_schema_dir)
    for p in work.iterdir():
        p.unlink()
    in_place = check_structure(good, work, ovf_schema_dir, extract=False)
    assert in_place.findings == [] and list(work.iterdir()) == []
    assert copied.disk_content[VMDK] and in_place.disk_content == {}  # the layout only: nothing inflated
    split = next(c[1] for c in CASES if c[0] == "vmdk-grain-table-marker-split")
    refused = check_structure(split(parts, tmp_path / "split.ova"), work, ovf_schema_dir, extract=False)
    assert any("disagree" in f for f in refused.findings), refused.findings


def test_qemu_imgs_own_stream_layout_is_read_and_checked(tmp_path: Path) -> None:
    """`qemu-img convert -o subformat=streamOptimized` (the export's fallback writer) keeps the grain
    directory and tables, and their redundant copies, in the header area: the walk reads that
    layout too, says what qemu-img reads, and refuses it when tables and markers disagree."""
    from appliance.verify_vmdk import raw_content_digest, walk_stream_vmdk

    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(3 * GRAIN * GT_ENTRIES + 3 * SECTOR)  # three tables' spans and a partial last grain
        for offset, data in ((0, GOOD_GRAIN), (GRAIN, EVIL_GRAIN), (GRAIN * GT_ENTRIES + 7, b"x" * 999)):
            f.seek(offset)
            f.write(data)
        f.seek(3 * GRAIN * GT_ENTRIES + 3 * SECTOR - 5)
        f.write(b"last!")
    disk = tmp_path / "q.vmdk"
    run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(disk)])
    walk = walk_stream_vmdk(disk, "q.vmdk")
    assert walk.problems == [] and walk.grain_tables >= 2
    back = tmp_path / "back.raw"
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(disk), str(back)])
    with back.open("rb") as f:
        assert raw_content_digest(f, walk.capacity) == walk.content_digest
    # Swap the first two entries of the first grain table: QEMU would read EVIL first.
    data = bytearray(disk.read_bytes())
    header = struct.unpack_from("<IIIQQQQIQQQ", data)
    table = struct.unpack_from("<I", data, header[9] * SECTOR)[0] * SECTOR
    first, second = struct.unpack_from("<II", data, table)
    struct.pack_into("<II", data, table, second, first)
    disk.write_bytes(bytes(data))
    problems = walk_stream_vmdk(disk, "q.vmdk").problems
    assert any("redundant grain directory and tables differ" in p or "disagree" in p for p in problems), problems


def test_a_vmdk_naming_a_host_fifo_is_refused_at_once(parts: Parts, tmp_path: Path, ovf_schema_dir: Path) -> None:
    """Capacity 0 and an embedded descriptor naming a FIFO that exists on this host: qemu-img used to
    open it and stall (120 s, a temporary disk1.vmdk left when killed); now nothing opens it."""
    import time

    from appliance.verify_ova import check_structure

    fifo = tmp_path / "host.fifo"
    os.mkfifo(fifo)
    layout = two_grains()
    layout.capacity = 0
    layout.descriptor = (b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                         b'createType="monolithicFlat"\n' + f'RW 131072 FLAT "{fifo}" 0\n'.encode())
    disk = layout.serialize()
    ova = ova_of(tmp_path / "fifo.ova", with_disk_attr(parts, "size", str(len(disk))), [(VMDK, disk)])
    work = tmp_path / "work"
    work.mkdir()
    started = time.monotonic()
    result = check_structure(ova, work, ovf_schema_dir)
    assert time.monotonic() - started < 2
    assert any("capacity 0; QEMU then opens the extents" in f for f in result.findings), result.findings
    assert list(work.iterdir()) == []
