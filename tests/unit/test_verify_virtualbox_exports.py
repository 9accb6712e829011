"""``verify_ova --no-boot`` accepts what VirtualBox itself writes, and stays strict about the rest.

tests/data/vbox/vbox-ovf10.ova and vbox-ovf20.ova were written by VirtualBox 7.2's own
``VBoxManage export --manifest`` (in the vbox tier's chroot; see tests/data/vbox/README.md):
manifest last, ``SHA1 (name) = hex`` / ``SHA256 (name) = hex`` lines, no tar end-of-archive
blocks, and VirtualBox's OVF 2.0 quirks (".xsd" namespace names, no ElementName). The vbox
tier repeats this on fresh exports (tests/vbox/test_vbox_export.py).
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from appliance.errors import VerifyError
from appliance.verify import verify_ova

DATA = Path(__file__).resolve().parent.parent / "data" / "vbox"


def members(ova: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(ova) as tar:
        out = []
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out.append((m.name, f.read()))
        return out


def pack(path: Path, parts: list[tuple[str, bytes]], *, end_blocks: bool = False) -> Path:
    """A tar of ``parts`` in this order, without end-of-archive blocks unless asked (as VirtualBox)."""
    with path.open("wb") as out:
        for name, data in parts:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            out.write(data + b"\0" * (-len(data) % 512))
        if end_blocks:
            out.write(b"\0" * 1024)
    return path


@pytest.mark.parametrize("name", ["vbox-ovf10.ova", "vbox-ovf20.ova"])
def test_virtualbox_exports_are_accepted(name: str, ovf_schema_dir: Path) -> None:
    ova = DATA / name
    names = [n for n, _ in members(ova)]
    assert names[-1].endswith(".mf") and names[0].endswith(".ovf")  # VirtualBox's layout, as stored
    report = verify_ova(ova, boot=False, schema_dir=ovf_schema_dir)
    assert dict(report.checks)["OVF schema"] == "checked"
    assert dict(report.checks)["manifest digests"] == "checked"
    assert report.ovf_format == ("ovf10" if "ovf10" in name else "ovf20")


def test_sample_has_no_end_of_archive_blocks() -> None:
    data = (DATA / "vbox-ovf10.ova").read_bytes()
    last = members(DATA / "vbox-ovf10.ova")[-1][1]
    assert data.rstrip(b"\0").endswith(last.rstrip(b"\0"))
    assert len(data) - data.rfind(last) - len(last) < 512  # nothing after the manifest's padding


def test_manifest_last_still_checks_digests(tmp_path: Path, ovf_schema_dir: Path) -> None:
    parts = members(DATA / "vbox-ovf10.ova")
    ovf, disk, mf = parts
    damaged = bytearray(disk[1])
    damaged[600] ^= 0xFF
    ova = pack(tmp_path / "damaged.ova", [ovf, (disk[0], bytes(damaged)), mf])
    with pytest.raises(VerifyError) as err:
        verify_ova(ova, boot=False, schema_dir=ovf_schema_dir)
    assert any("digest differs from the manifest" in r for r in err.value.reasons)


def test_archive_cut_after_a_member_is_refused(tmp_path: Path, ovf_schema_dir: Path) -> None:
    ovf, disk, _mf = members(DATA / "vbox-ovf10.ova")
    ova = pack(tmp_path / "cut.ova", [ovf, disk])  # ends cleanly at a member boundary, manifest gone
    with pytest.raises(VerifyError) as err:
        verify_ova(ova, boot=False, schema_dir=ovf_schema_dir)
    assert any("no manifest" in r for r in err.value.reasons)


def test_manifest_in_the_middle_is_refused(tmp_path: Path, ovf_schema_dir: Path) -> None:
    ovf, disk, mf = members(DATA / "vbox-ovf10.ova")
    extra = ("notes.txt", b"x")
    mf_text = mf[1] + f"SHA1 (notes.txt) = {hashlib.sha1(b'x').hexdigest()}\n".encode()
    ova = pack(tmp_path / "middle.ova", [ovf, disk, (mf[0], mf_text), extra])
    with pytest.raises(VerifyError) as err:
        verify_ova(ova, boot=False, schema_dir=ovf_schema_dir)
    assert any("second member" in r for r in err.value.reasons)


def test_virtualbox_ovf20_repair_applies_only_to_its_quirks(tmp_path: Path, ovf_schema_dir: Path) -> None:
    # VirtualBox's .xsd namespaces are tolerated, but a real schema problem next to them still counts.
    ovf, disk, mf = members(DATA / "vbox-ovf20.ova")
    bad = ovf[1].replace(b"<vssd:VirtualSystemType>", b"<vssd:Bogus>x</vssd:Bogus><vssd:VirtualSystemType>")
    assert bad != ovf[1]
    digest = hashlib.sha256(bad).hexdigest()
    lines = [line if not line.startswith(f"SHA256 ({ovf[0]})") else f"SHA256 ({ovf[0]}) = {digest}"
             for line in mf[1].decode().splitlines()]
    ova = pack(tmp_path / "bad20.ova", [(ovf[0], bad), disk, (mf[0], ("\n".join(lines) + "\n").encode())])
    with pytest.raises(VerifyError) as err:
        verify_ova(ova, boot=False, schema_dir=ovf_schema_dir)
    assert any("breaks the OVF schema" in r and "Bogus" in r for r in err.value.reasons)
