"""The output-format records (appliance/formats.py) and what is generated from them."""

from __future__ import annotations

import pytest

from appliance.formats import (
    DEFAULT_FORMATS,
    FORMATS,
    DiskProfile,
    OutputFormat,
    get_format,
    register,
    virtualbox_ova,
)
from appliance.reference import FORMATS_PATH, formats_reference


def test_committed_formats_table_is_current() -> None:
    text = FORMATS_PATH.read_text()
    assert text == formats_reference(text), "run `invoke docs` and commit docs/formats.md"


def test_every_format_has_its_own_section_in_the_docs() -> None:
    text = FORMATS_PATH.read_text()
    for name in FORMATS:
        # a heading may spell the format as its owners do ("## VHDX" for `vhdx`)
        assert f"## {name}" in text.lower() or f", {name}" in text, f"docs/formats.md has no section for {name}"


def test_the_default_is_the_virtualbox_ova_alone() -> None:
    assert DEFAULT_FORMATS == ("virtualbox-ova",)
    fmt = get_format("virtualbox-ova")
    assert fmt.file_name("csghub-2.4.0") == "csghub-2.4.0.ova"
    assert fmt.ovf is not None and fmt.ovf.version == "ovf10" and fmt.ovf.vboxmanage_flag == "--ovf10"


def test_each_ovf_version_gets_the_manifest_digest_its_spec_prescribes() -> None:
    # DSP0243 1.x: SHA-1; 2.0: SHA-256 (VirtualBox's exporter does the same).
    assert virtualbox_ova("ovf10").ovf.manifest_digest == "SHA1"  # type: ignore[union-attr]
    assert virtualbox_ova("ovf20").ovf.manifest_digest == "SHA256"  # type: ignore[union-attr]


def test_file_names_never_collide() -> None:
    names = [fmt.file_name("x") for fmt in FORMATS.values()]
    assert len(set(names)) == len(names)


def test_unknown_format_names_the_allowed_ones() -> None:
    with pytest.raises(KeyError, match="allowed: virtualbox-ova"):
        get_format("ovf30")


def test_a_record_needs_its_kinds_profile_and_a_new_name() -> None:
    with pytest.raises(ValueError, match="needs exactly its own profile"):
        OutputFormat(name="x", kind="disk", suffix=".raw", tag="", title="x", hypervisors=(), how_to_import="")
    with pytest.raises(ValueError, match="registered twice"):
        register(get_format("virtualbox-ova"))
    disk = OutputFormat(name="raw-test", kind="disk", suffix=".ova", tag="", title="x", hypervisors=(),
                        how_to_import="", disk=DiskProfile(qemu_format="raw"))
    with pytest.raises(ValueError, match="same file name"):
        register(disk)
