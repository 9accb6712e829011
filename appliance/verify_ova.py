"""The structural check of an OVA that may be hostile: tar, order, descriptor, manifest, disks.

``check_structure(path, work)`` reads the archive and turns every problem into a finding (a
one-line reason); it raises nothing for bad input. What it promises for any input:

- **Nothing is written outside ``work``**, and nothing is written under a name taken from the
  archive: a disk that passes is copied to ``work/disk<N>.vmdk`` (a name made here, opened with
  ``O_EXCL``). Only members whose names are plain file names listed in the descriptor's
  ``References`` as disks are copied out, and only when the tar, order, descriptor, schema and
  manifest checks found nothing; the copy is the very bytes that are hashed, and a copy whose
  digest differs from the manifest is deleted.
- **Bounded memory, disk and time**: the descriptor and manifest are read only up to fixed caps;
  disks are copied by their member size, which must equal the descriptor's ``ovf:size`` and fit
  the free space of ``work``; zero blocks are skipped (a sparse copy); numbers in the descriptor
  are bounded (see ``appliance.export.ovf``); member and finding counts are capped; an archive
  whose members claim far more bytes than the file stores (a sparse-file bomb) is refused
  before anything is hashed.
- **Safe XML**: the descriptor is parsed without DTD or entities (``defusedxml``).
- **Strict, not fussy**: what VirtualBox 7.2's ``VBoxManage export --manifest`` writes is
  accepted: the ``.mf`` last, ``SHA1 (name) = hex`` lines, GNU tar headers and no end-of-archive
  blocks.

The tar headers are decoded by Python's ``tarfile`` (``TarInfo.frombuf``: checksum, number
fields, type); the walk over them is ours, so no member is ever interpreted (no PAX or GNU
long-name processing, no path handling) and member data is only seeked over. ``TarFile.next``
would read a PAX or GNU long-name member whole into memory by its declared size (a MemoryError
under the hostile-input test's 1 GiB cap: its ``sparse-pax-3GiB`` case), so tarfile stays the
header decoder and not the walker.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import PrerequisiteMissing
from appliance.export.ovf import DescriptorFacts, read_descriptor, schema_errors
from appliance.formats import STREAM_OPTIMIZED, manifest_digests_for
from appliance.inputs import describe, open_regular
from appliance.log import log
from appliance.run import run
from appliance.verify_vmdk import walk_stream_vmdk

BLOCK = tarfile.BLOCKSIZE
CHUNK = 4 << 20
# Caps on what is read into memory from an untrusted archive. VirtualBox's own descriptors are
# a few tens of KB; its manifests a few hundred bytes.
MAX_DESCRIPTOR_BYTES = 4 << 20
MAX_MANIFEST_BYTES = 1 << 20
# Markup in the descriptor ("<" counted before parsing). A descriptor of tiny elements within the
# byte cap (4 MiB of "<x/>") parses into a million nodes: 1.2 GB of memory and 40 s of schema
# checking. Real descriptors hold a few hundred tags; a EULA's text has its "<" escaped.
MAX_DESCRIPTOR_TAGS = 20_000
MAX_MEMBERS = 64
MAX_FINDINGS = 100
# Room left free in the work folder after the disks are copied there.
FREE_SPACE_MARGIN = 64 << 20
# An archive whose members claim more than this many times the bytes the file really stores
# (plus the slack) is a sparse-file bomb: hashing it would read gigabytes of holes.
SPARSE_FACTOR = 2
SPARSE_SLACK = 64 << 20

_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512) ?\((.+)\) ?= ?([0-9a-fA-F]+)$")
_HASHES = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TYPE_NAMES = {
    tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO", tarfile.DIRTYPE: "a directory",
    tarfile.CONTTYPE: "a contiguous file", tarfile.GNUTYPE_SPARSE: "a GNU sparse file",
}


class Findings(list[str]):
    """Every problem found, capped at ``MAX_FINDINGS`` lines (the rest are counted)."""

    dropped = 0

    def add(self, reason: str) -> None:
        if len(self) < MAX_FINDINGS:
            self.append(reason)
        else:
            self.dropped += 1

    def close(self) -> None:
        if self.dropped:
            self.append(f"... and {self.dropped} more problems")
            self.dropped = 0


@dataclass(frozen=True)
class TarMember:
    name: str
    size: int
    data_offset: int
    kind: str  # "ustar" or "gnu" (a v7 header is a finding but still walked)
    regular: bool = True  # a plain-named regular file: the only kind ever read


@dataclass
class StructureResult:
    """What the structural check saw; ``findings`` empty means the OVA is sound."""

    members: list[str] = field(default_factory=list)
    ovf_format: str | None = None
    disks: dict[str, int] = field(default_factory=dict)  # href -> capacity in bytes
    extracted: dict[str, Path] = field(default_factory=dict)  # href -> copy in the work folder
    # href -> what both importers read from it (appliance.verify_vmdk.VmdkWalk.content_digest)
    disk_content: dict[str, str] = field(default_factory=dict)
    checks: list[tuple[str, str]] = field(default_factory=list)
    findings: Findings = field(default_factory=Findings)


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain file name (one path component, printable), or None."""
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return "it names a directory"
    if "/" in name or "\\" in name:
        return "it has a directory part"
    if _CONTROL.search(name):
        return "it holds control characters"
    if any("\udc80" <= c <= "\udcff" for c in name):  # bytes that were not UTF-8 (surrogateescape)
        return "it is not UTF-8"
    return None


# VirtualBox's OVA reader (ApplianceImplImport.cpp, Appliance::i_readFSOVA) treats every member
# whose name ends in .ovf, .mf or .cert (any case) as the descriptor, its manifest or its
# signature, first one winning; a listed file may not look like one of them.
_SPECIAL_SUFFIXES = (".ovf", ".mf", ".cert")


def _special_name(href: str, ovf_name: str, mf_name: str) -> str | None:
    """Why VirtualBox could take the listed file ``href`` for something else, or None."""
    if href.casefold() in (ovf_name.casefold(), mf_name.casefold()) and href not in (ovf_name, mf_name):
        return "it differs from the descriptor's or manifest's name only in case"
    if href.casefold().endswith(_SPECIAL_SUFFIXES) and href not in (ovf_name, mf_name):
        return "VirtualBox reads a member ending in .ovf, .mf or .cert as a descriptor, manifest or signature"
    if "(" in href or ")" in href:
        return "a manifest line 'SHA256(name)= hex' cannot hold it unambiguously"
    return None


# -- tar reading ----------------------------------------------------------------------------------


def scan_tar(f: io.BufferedReader, file_size: int, findings: list[str]) -> list[TarMember]:
    """Walk the tar headers (seeking over the data); every format problem goes to ``findings``.

    The archive may end after the last member's data without end-of-archive blocks (VirtualBox
    writes it so). A header that fails its checksum ends the walk: nothing after it can be trusted.
    """
    add = findings.add if isinstance(findings, Findings) else findings.append
    members: list[TarMember] = []
    offset = 0
    while True:
        f.seek(offset)
        header = f.read(BLOCK)
        if not header:
            return members  # the end, at a member boundary
        if len(header) < BLOCK:
            add(f"tar: archive ends inside a header at byte {offset} (truncated)")
            return members
        if header == bytes(BLOCK):
            return members  # end-of-archive (one zero block is enough)
        if len(members) >= MAX_MEMBERS:
            add(f"tar: more than {MAX_MEMBERS} members; an OVA holds a descriptor, a manifest and its disks")
            return members
        where = f"tar header at byte {offset}"
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            what = "checksum mismatch" if "checksum" in str(exc) else f"unreadable ({exc})"
            add(f"{where}: {what} (damaged header, or not a tar archive)")
            return members
        raw_name = header[:100].split(b"\0", 1)[0]
        name = raw_name.decode("utf-8", "surrogateescape")
        shown = raw_name.decode("utf-8", "backslashreplace")
        magic, version = header[257:263], header[263:265]
        if magic == b"ustar\0" and version == b"00":
            kind = "ustar"
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
                shown = prefix.decode("utf-8", "backslashreplace") + "/" + shown
        elif magic == b"ustar " and version == b" \0":
            kind = "gnu"
        else:
            kind = "v7"
            add(f"tar member {shown!r}: not a ustar header (magic {magic!r}); OVA needs ustar")
        size = info.size
        regular = False
        if size < 0:
            add(f"tar member {shown!r}: negative size field (damaged header)")
            return members
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            add(f"tar member {shown!r}: PAX extended header, which VirtualBox cannot import")
        elif info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            add(f"tar member {shown!r}: GNU long-name header; OVA member names must fit ustar")
        elif info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            what = _TYPE_NAMES.get(info.type, f"of type {info.type!r}")
            target = f" (to {info.linkname!r})" if info.linkname else ""
            add(f"tar member {shown!r}: is {what}{target}, not a regular file")
        elif (problem := name_problem(name)) is not None:
            add(f"tar member {shown!r}: not a plain file name ({problem})")
        else:
            regular = True
        data_offset = offset + BLOCK
        if data_offset + size > file_size:
            add(f"tar member {shown!r}: its {size} bytes run past the archive's end (truncated)")
            members.append(TarMember(name if regular else shown, size, data_offset, kind, False))
            return members
        members.append(TarMember(name if regular else shown, size, data_offset, kind, regular))
        offset = data_offset + size + (-size % BLOCK)


def parse_manifest(text: str, findings: list[str]) -> dict[str, tuple[str, str]]:
    """``{file name: (algorithm, hex digest)}``; malformed lines go to ``findings``.

    Accepts ``SHA256(name)= hex`` (OpenSSL, ovftool, our writer) and ``SHA1 (name) = hex``
    (VirtualBox).
    """
    add = findings.add if isinstance(findings, Findings) else findings.append
    entries: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MANIFEST_LINE.match(line.strip())
        if not m:
            add(f"manifest line {number} is not 'SHA256(name)= hex' or 'SHA1 (name) = hex': {line[:80]!r}")
            continue
        algo, name, digest = m.groups()
        if (problem := name_problem(name)) is not None:
            add(f"manifest line {number}: {name[:80]!r} is not a plain file name ({problem})")
            continue
        if len(digest) != hashlib.new(_HASHES[algo]).digest_size * 2:
            add(f"manifest line {number}: {algo} digest of {name!r} has the wrong length")
        if name in entries:
            add(f"manifest lists {name!r} twice")
        entries[name] = (algo, digest.lower())
    return entries


def _read_member(f: io.BufferedReader, member: TarMember, cap: int, what: str, findings: Findings) -> bytes | None:
    if member.size > cap:
        findings.add(f"{what} {member.name!r} is {member.size} bytes; more than the {cap} allowed")
        return None
    f.seek(member.data_offset)
    return f.read(member.size)


def _copy_and_hash(f: io.BufferedReader, member: TarMember, algorithms: set[str], out: Path | None) -> dict[str, str]:
    """Hash the member's bytes; with ``out``, write those same bytes there (holes for zero blocks)."""
    hashers = {a: hashlib.new(_HASHES[a]) for a in algorithms}
    f.seek(member.data_offset)
    remaining = member.size
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    zeros = bytes(CHUNK)
    sink = out.open("xb") if out is not None else None  # "x": never follows or replaces anything
    try:
        while remaining:
            n = f.readinto(view[: min(CHUNK, remaining)])
            if not n:
                raise OSError(errno.EIO, f"{member.name}: the archive ended early")
            for h in hashers.values():
                h.update(view[:n])
            if sink is not None:
                if view[:n] == zeros[:n]:
                    sink.seek(n, io.SEEK_CUR)
                else:
                    sink.write(view[:n])
            remaining -= n
        if sink is not None:
            sink.truncate()  # a trailing hole still counts towards the size
    except BaseException:
        if out is not None:
            out.unlink(missing_ok=True)  # no partial copy stays behind (disk full, Ctrl-C)
        raise
    finally:
        if sink is not None:
            sink.close()
    return {a: h.hexdigest() for a, h in hashers.items()}


# -- the check ------------------------------------------------------------------------------------


NO_SCHEMA_DIR = "no folder of DMTF OVF schemas was given; `invoke fetch` puts the pinned schemas in the cache"


def check_structure(path: Path, work: Path, schema_dir: Path | None = None, *,
                    schema_missing: str = NO_SCHEMA_DIR, extract: bool = True) -> StructureResult:
    """Every structural check of ``path``; disks that pass are copied into ``work``.

    ``schema_dir`` holds the verified DMTF schemas (``ovf1/``, ``ovf2/``); without it the schema
    check does not run and ``schema_missing`` is the reason the report gives. With
    ``extract=False`` (publish's re-check) nothing is copied: each disk's layout is walked in place,
    inside the archive, without inflating its grains (no ``disk_content``), and ``qemu-img`` is not run.
    """
    result = StructureResult()
    try:
        with open_regular(path) as f:
            _check(f, os.fstat(f.fileno()), path, work, result, schema_dir, schema_missing, extract)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            result.findings.add(f"the work folder {work} ran out of space while copying the disk")
        else:
            result.findings.add(f"reading {path.name} failed: {describe(exc)}")
    except (RecursionError, MemoryError, ValueError, UnicodeError) as exc:
        # A last line of defence: the checks above bound their input, but a hostile archive must
        # give a finding, never a traceback.
        result.findings.add(f"{path.name} could not be checked: {type(exc).__name__}: {str(exc)[:200]}")
    if result.findings:
        for copy in result.extracted.values():
            copy.unlink(missing_ok=True)
        result.extracted.clear()
    result.findings.close()
    return result


def _check(f: io.BufferedReader, st: os.stat_result, path: Path, work: Path, result: StructureResult,
           schema_dir: Path | None, schema_missing: str, extract: bool = True) -> None:
    findings = result.findings
    members = scan_tar(f, st.st_size, findings)
    result.members = [m.name for m in members]
    result.checks.append(("tar format", "checked"))
    regular = [m for m in members if m.regular]
    by_name: dict[str, TarMember] = {}
    folded: dict[str, str] = {}
    for m in regular:
        if m.name in by_name:
            findings.add(f"tar member {m.name!r} appears twice")
        elif m.name.casefold() in folded:
            # VirtualBox finds a disk's member by RTStrICmp (i_importOpenSourceFile): two names that
            # differ only in case are one name to it.
            findings.add(f"tar members {folded[m.name.casefold()]!r} and {m.name!r} differ only in case; "
                         "VirtualBox matches member names without case")
        by_name.setdefault(m.name, m)
        folded.setdefault(m.name.casefold(), m.name)
    if not members:
        if not findings:
            findings.add("the archive holds no members (not an OVA)")
        return
    claimed = sum(m.size for m in members)
    stored = st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    if claimed > SPARSE_FACTOR * stored + SPARSE_SLACK:
        findings.add(f"members claim {claimed} bytes but the file stores only {stored} (a sparse-file bomb); "
                     "not read")
        return

    # The descriptor: first, one of it, bounded.
    ovfs = [m for m in regular if m.name.endswith(".ovf")]
    if len(ovfs) > 1:
        findings.add(f"the archive holds {len(ovfs)} .ovf descriptors; an OVA holds one")
    if not members[0].name.endswith(".ovf") or not members[0].regular:
        findings.add(f"first member is {members[0].name!r}; an OVA must start with its .ovf descriptor")
    if not ovfs:
        findings.add("no .ovf descriptor in the archive")
        return
    ovf = ovfs[0]
    mf_name = ovf.name[:-4] + ".mf"
    ovf_bytes = _read_member(f, ovf, MAX_DESCRIPTOR_BYTES, "descriptor", findings)
    facts: DescriptorFacts | None = None
    if ovf_bytes is not None and (tags := ovf_bytes.count(b"<")) > MAX_DESCRIPTOR_TAGS:
        findings.add(f"descriptor {ovf.name} holds {tags} tags; more than the {MAX_DESCRIPTOR_TAGS} allowed "
                     "(not parsed)")
    elif ovf_bytes is not None:
        try:
            facts = read_descriptor(ovf_bytes)
        except ValueError as exc:
            findings.add(f"descriptor {ovf.name}: {exc}")
    disk_hrefs: dict[str, int] = {}
    if facts is not None:
        result.ovf_format = facts.ovf_format
        disk_hrefs = _check_references(facts, ovf.name, mf_name, members, by_name, result)
        _check_schema(ovf_bytes or b"", ovf.name, schema_dir, schema_missing, result)

    # The manifest: required, bounded, covering every member.
    manifest: dict[str, tuple[str, str]] = {}
    mf = by_name.get(mf_name)
    if mf is None:
        findings.add(f"no manifest {mf_name!r} in the archive")
    else:
        mf_bytes = _read_member(f, mf, MAX_MANIFEST_BYTES, "manifest", findings)
        if mf_bytes is not None:
            try:
                text = mf_bytes.decode("utf-8")
            except UnicodeDecodeError:
                findings.add(f"manifest {mf_name} is not UTF-8 text")
            else:
                manifest = parse_manifest(text, findings)
                if not text.strip():
                    # VirtualBox imports with an empty manifest and checks nothing (i_readManifestFile:
                    # "the file could be empty, in which case fDigestTypes is set to 0").
                    findings.add(f"manifest {mf_name} is empty; it must list a digest of every member")
    if facts is not None:
        # What the format records allow beside this OVF version (appliance.formats).
        allowed = manifest_digests_for(facts.ovf_format)
        for name, (algo, _) in manifest.items():
            if algo not in allowed:
                findings.add(f"manifest digest {algo} of {name!r} is not one an OVF {facts.ovf_format} reader takes "
                             f"(allowed: {', '.join(allowed)})")
    for name in by_name:
        if name != mf_name and name not in manifest:
            findings.add(f"tar member {name!r} has no digest in the manifest")
    for name in manifest:
        if name not in by_name:
            findings.add(f"manifest lists {name!r}, which is not in the archive")

    # Copy the disks out only when everything so far is sound, and only into room that exists.
    copy_to: dict[str, Path] = {}
    if not findings and disk_hrefs and extract:
        need = sum(by_name[h].size for h in disk_hrefs) + FREE_SPACE_MARGIN
        free = shutil.disk_usage(work).free
        if need > free:
            findings.add(f"the disks need {need} bytes in the work folder {work}, which has {free} free "
                         "(point TMPDIR at a folder with room)")
        else:
            copy_to = {href: work / f"disk{n}.vmdk" for n, href in enumerate(disk_hrefs, 1)}

    # One pass: digests of every listed member; the disks copied on the way.
    compared = 0
    for m in regular:
        if m.name not in manifest:
            continue
        compared += 1
        algo, listed = manifest[m.name]
        out = copy_to.get(m.name)
        if m is ovf:
            if ovf_bytes is None:
                continue  # too big to read: already a finding
            got = hashlib.new(_HASHES[algo], ovf_bytes).hexdigest()
        else:
            got = _copy_and_hash(f, m, {algo}, out)[algo]
            if out is not None:
                result.extracted[m.name] = out
        if got != listed:
            findings.add(f"{m.name}: {algo} digest differs from the manifest (damaged or altered)")
    # "checked" only when every member but the manifest itself was compared with a listed digest.
    whole = compared and compared == len([n for n in by_name if n != mf_name])
    result.checks.append(("manifest digests", "checked" if whole else
                          f"NOT checked: {compared} of {len(by_name) - (mf_name in by_name)} members compared"))

    if not findings and result.extracted:
        for href, copy in result.extracted.items():
            _check_disk(href, copy, disk_hrefs[href], findings, result.disk_content)
        result.checks.append(("disk format and size", "checked"))
    elif not findings and disk_hrefs and not extract:
        for href in disk_hrefs:
            member = by_name[href]
            _check_disk(href, path, disk_hrefs[href], findings, result.disk_content,
                        window=(member.data_offset, member.size))
        result.checks.append(("disk format and size", "checked in place"))


def _check_references(facts: DescriptorFacts, ovf_name: str, mf_name: str, members: list[TarMember],
                      by_name: dict[str, TarMember], result: StructureResult) -> dict[str, int]:
    """Names, order and declared sizes; returns the disks to copy (href -> capacity)."""
    findings = result.findings
    hrefs: list[str] = []
    sizes: dict[str, int | None] = {}
    for ambiguity in facts.ambiguities:
        findings.add(f"descriptor {ovf_name}: {ambiguity}")
    for _, href, size in facts.files:
        if (problem := name_problem(href) or _special_name(href, ovf_name, mf_name)) is not None:
            findings.add(f"References: href {href[:80]!r} is not a plain file name ({problem})")
            continue
        if href in (ovf_name, mf_name) or href in sizes:
            findings.add(f"References: {href!r} is listed twice or names the descriptor or manifest")
            continue
        hrefs.append(href)
        sizes[href] = size
        if href not in by_name:
            findings.add(f"{href!r} is listed in References but missing from the archive")
    expected = [ovf_name, mf_name, *hrefs]
    for m in members:
        if m.regular and m.name not in expected:
            findings.add(f"tar member {m.name!r} is not listed in the descriptor's References")
    actual = [m.name for m in members if m.regular]  # an unlisted member breaks the order too
    present = [n for n in expected if n in by_name]
    mf_last = [n for n in present if n != mf_name] + ([mf_name] if mf_name in by_name else [])
    if actual not in (present, mf_last):
        shown = actual if len(actual) <= 6 else [*actual[:6], f"... {len(actual) - 6} more"]
        findings.add(f"members are out of order: {shown}; expected {present} "
                     f"(or the manifest last, as VirtualBox writes it)")
    result.checks.append(("member order", "checked"))

    disks: dict[str, int] = {}
    file_by_id = {fid: href for fid, href, _ in facts.files}
    for disk_id, file_ref, capacity, fmt in facts.disks:
        href = file_by_id.get(file_ref, "")
        if not href:
            findings.add(f"disk {disk_id[:80]!r} refers to file id {file_ref[:80]!r}, which References lacks")
            continue
        if href not in sizes:
            continue  # already reported as not a plain name
        if fmt != STREAM_OPTIMIZED:
            findings.add(f"disk {disk_id[:80]!r} declares format {fmt[:120]!r}, not streamOptimized VMDK")
        member = by_name.get(href)
        declared = sizes[href]
        if member is not None and declared is not None and declared != member.size:
            findings.add(f"{href}: descriptor says {declared} bytes, archive holds {member.size}")
        if href in disks:
            findings.add(f"{href}: used by more than one disk")
        result.disks[href] = capacity
        disks[href] = capacity
    return disks


def _check_schema(ovf_bytes: bytes, ovf_name: str, sd: Path | None, schema_missing: str,
                  result: StructureResult) -> None:
    if sd is None:
        _schema_not_run(result, schema_missing)
        return
    tolerated: list[str] = []
    try:
        errors = schema_errors(ovf_bytes, sd, tolerated=tolerated, limit=21)
    except RecursionError:
        result.findings.add(f"descriptor {ovf_name} nests elements too deeply to validate")
        return
    except (PrerequisiteMissing, ImportError, OSError, StopIteration) as exc:
        _schema_not_run(result, f"the schemas in {sd} could not be loaded: {str(exc)[:200] or type(exc).__name__}")
        return
    except (LookupError, ValueError, TypeError) as exc:
        # xmlschema raises on some hostile input instead of reporting it, e.g. XMLSchemaKeyError
        # for an xsi:type naming a type no schema declares (OVF 0.9's "ovf:DiskSection_Type").
        result.findings.add(f"descriptor {ovf_name} cannot be validated against the OVF schema: "
                            f"{str(exc)[:200] or type(exc).__name__}")
        return
    for e in errors[:20]:
        result.findings.add(f"descriptor {ovf_name} breaks the OVF schema: {e}")
    if len(errors) > 20:
        result.findings.add(f"descriptor {ovf_name} breaks the OVF schema in more places")
    if tolerated:
        # What VirtualBox writes is valid by definition: its known OVF 2.0 deviations are named, not refused.
        result.checks.append(("OVF schema", f"checked ({'; '.join(tolerated)})"))
    else:
        result.checks.append(("OVF schema", "checked"))


def _schema_not_run(result: StructureResult, why: str) -> None:
    log.warning(f"OVF schema validation did NOT run: {why}")
    result.checks.append(("OVF schema", f"not run: {why}"))


def _check_disk(href: str, vmdk: Path, capacity: int, findings: Findings,
                content: dict[str, str] | None = None, window: tuple[int, int] | None = None) -> None:
    """Our own walk of the copy (``appliance.verify_vmdk``: what VirtualBox's sequential reader and
    QEMU's grain tables read must be one disk; nothing else is opened), then ``qemu-img info``:
    streamOptimized, one extent (itself), no backing file, the right size.
    """
    walk = walk_stream_vmdk(vmdk, href, window, inflate=window is None)
    for problem in walk.problems:
        findings.add(f"{href}: {problem}")
    if walk.problems:
        return  # qemu-img never opens a VMDK the walk refused (capacity 0 would make it open named files)
    if walk.capacity != capacity:
        findings.add(f"{href}: VMDK capacity {walk.capacity} differs from the descriptor's capacity {capacity}")
    if content is not None and walk.content_digest:
        content[href] = walk.content_digest
    if window is not None:
        return  # inside the archive: qemu-img reads files, and the walk above is the stricter reading
    result = run(["qemu-img", "info", "--output=json", "-f", "vmdk", str(vmdk)], check=False, timeout=120)
    if result.returncode == 127:
        raise PrerequisiteMissing("qemu-img is not installed: the disk check cannot run",
                                  hint="apt-get install --no-install-recommends qemu-utils")
    if not result.ok:
        findings.add(f"{href}: qemu-img cannot read it as VMDK: {' '.join(result.tail('stderr', 3))[:300]}")
        return
    try:
        info = json.loads(result.stdout)
        data = info.get("format-specific", {}).get("data", {})
        create_type = data.get("create-type")
        extents = [e.get("filename") for e in data.get("extents", [])]
    except (ValueError, AttributeError, TypeError):
        findings.add(f"{href}: qemu-img's description of it is unreadable")
        return
    if create_type != "streamOptimized":
        findings.add(f"{href}: VMDK subformat is {create_type!r}, not streamOptimized")
    if any(e != str(vmdk) for e in extents):
        findings.add(f"{href}: the VMDK names other files as extents: {extents[:3]}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        findings.add(f"{href}: the VMDK names a parent disk {info.get('backing-filename')!r}; an OVA disk has none")
    if info.get("virtual-size") != capacity:
        findings.add(f"{href}: virtual size {info.get('virtual-size')} differs from the descriptor's "
                     f"capacity {capacity}")
