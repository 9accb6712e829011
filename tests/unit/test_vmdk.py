"""The parallel streamOptimized VMDK writer, read back by QEMU's own VMDK reader.

Every disk is made with real tools (qemu-img, qemu-io, plain file writes), written with
``write_stream_vmdk``, and then judged by ``qemu-img check`` (no errors) and ``qemu-img
compare`` (identical to the source, byte for byte as the guest sees it). A small walker of
our own checks what qemu-img does not: grains strictly in LBA order (VirtualBox's sequential
reader, which imports OVAs, refuses anything else), no all-zero grain written, and the
metadata markers where the format wants them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.errors import ExportError
from appliance.export import ova as ova_module
from appliance.export import vmdk as vmdk_module
from appliance.export.ova import write_ova
from appliance.export.vmdk import (
    GRAIN,
    SECTOR,
    UnsupportedSource,
    VmdkResult,
    source_layout,
    write_stream_vmdk,
)
from appliance.run import run
from appliance.verify import verify_ova

MiB = 1 << 20


def write_vmdk(source: Path, dest: Path, **kwargs: int) -> VmdkResult:
    with dest.open("wb") as f:
        return write_stream_vmdk(source, f, name=dest.name, **kwargs)


def assert_qemu_reads_it_as(source: Path, source_format: str, vmdk: Path) -> None:
    check = run(["qemu-img", "check", "-f", "vmdk", str(vmdk)])
    assert "No errors were found" in check.stdout
    run(["qemu-img", "compare", "-f", source_format, "-F", "vmdk", str(source), str(vmdk)])
    info = json.loads(run(["qemu-img", "info", "--output=json", str(vmdk)]).stdout)
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    source_info = json.loads(run(["qemu-img", "info", "--output=json", str(source)]).stdout)
    assert info["virtual-size"] == source_info["virtual-size"]


def walk(vmdk: Path) -> tuple[list[int], list[int]]:
    """Follow the stream marker by marker as a sequential reader does: (grain LBAs, metadata types)."""
    data = vmdk.read_bytes()
    magic, version, flags = struct.unpack_from("<III", data, 0)
    assert (magic, version, flags) == (0x564D444B, 3, 0x30001)
    overhead = struct.unpack_from("<Q", data, 64)[0]
    # Header and descriptor fill a whole grain, as in VirtualBox's own streams: with less, VirtualBox
    # 7.2's OVA import crashed under load (appliance/export/vmdk.py, benchmarks/vbox_import.py).
    assert overhead == GRAIN // SECTOR
    descriptor = data[SECTOR:overhead * SECTOR].rstrip(b"\0")  # then zeros up to the first marker
    assert descriptor.startswith(b"# Disk DescriptorFile") and b"\0" not in descriptor
    assert struct.unpack_from("<Q", data, 56)[0] == 0xFFFF_FFFF_FFFF_FFFF  # GD at end
    pos = overhead * SECTOR
    lbas: list[int] = []
    kinds: list[int] = []
    while True:
        value, size = struct.unpack_from("<QI", data, pos)
        if size:
            payload = data[pos + 12:pos + 12 + size]
            assert len(zlib.decompress(payload)) == GRAIN  # a whole grain, zlib-wrapped
            lbas.append(value)
            pos += -(-(12 + size) // SECTOR) * SECTOR
            continue
        kind = struct.unpack_from("<I", data, pos + 12)[0]
        kinds.append(kind)
        pos += SECTOR + value * SECTOR
        if kind == 0:
            break
    assert pos == len(data), "the end-of-stream marker is the last sector"
    footer = data[-2 * SECTOR:-SECTOR]
    gd_offset = struct.unpack_from("<Q", footer, 56)[0]
    assert kinds[-3:] == [2, 3, 0]  # grain directory, footer, end of stream
    assert gd_offset * SECTOR < len(data) - 3 * SECTOR
    return lbas, kinds


def nonzero_grains(raw: Path) -> int:
    count = 0
    with raw.open("rb") as f:
        while chunk := f.read(GRAIN):
            count += any(chunk)
    return count


def make_raw(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    return path


RAW_CASES: dict[str, tuple[int, list[tuple[int, bytes]]]] = {
    # holes between data, random (incompressible) and text-like data
    "holes": (96 * MiB, [(3 * MiB, os.urandom(2 * MiB)), (50 * MiB + 4096, b"csghub " * 50000)]),
    # zeros that were written (allocated, not a hole) must not become grains
    "zero-runs": (64 * MiB, [(1 * MiB, bytes(8 * MiB)), (20 * MiB, b"\x01" + bytes(GRAIN * 3) + b"\x02")]),
    # the very last sector of the disk holds data
    "data-at-end": (48 * MiB, [(48 * MiB - 7, b"THE END")]),
    # 100 MiB + 3 sectors: the last grain is partial (padded to a whole grain inside the VMDK)
    "not-a-grain-multiple": (100 * MiB + 3 * SECTOR, [(0, b"first"), (100 * MiB + 3 * SECTOR - 5, b"last!")]),
    # one byte in every grain of a grain table's span, then the next span empty, then data again
    "every-grain": (80 * MiB, [(g * GRAIN + 17, b"x") for g in range(512)] + [(70 * MiB, b"y")]),
    # a disk of zeros only: header, descriptor, directory, footer, end marker and nothing else
    "empty": (16 * MiB, []),
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_raw_disks_read_back_identical(case: str, tmp_path: Path) -> None:
    size, writes = RAW_CASES[case]
    raw = make_raw(tmp_path / "disk.raw", size, writes)
    vmdk = tmp_path / "disk.vmdk"
    result = write_vmdk(raw, vmdk)
    assert_qemu_reads_it_as(raw, "raw", vmdk)
    lbas, _ = walk(vmdk)
    assert lbas == sorted(set(lbas)), "grains strictly in LBA order"
    assert len(lbas) == result.grains == nonzero_grains(raw)
    assert result.size == vmdk.stat().st_size
    assert result.sha256 == hashlib.sha256(vmdk.read_bytes()).hexdigest()


def test_qcow2_with_a_backing_file_is_read_through_the_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 30M 1M", str(base)])
    top = tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.name, str(top)])
    # overwrite part of the base, zero part of it, add new data
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 4M 1M", "-c", "write -z 30M 512k",
         "-c", "write -P 0x44 63M 1M", str(top)])
    layout = source_layout(top)
    assert {Path(f).name for f in layout.files} == {"top.qcow2", "base.qcow2"}
    vmdk = tmp_path / "top.vmdk"
    write_vmdk(top, vmdk)
    assert_qemu_reads_it_as(top, "qcow2", vmdk)


def test_a_multi_gib_sparse_disk(tmp_path: Path) -> None:
    size = 6 << 30
    writes = [(0, os.urandom(GRAIN)), (3 << 30, b"middle" * 1000), ((4 << 30) + 5 * GRAIN, os.urandom(3 * MiB)),
              (size - SECTOR, b"\xff" * SECTOR)]
    raw = make_raw(tmp_path / "big.raw", size, writes)
    vmdk = tmp_path / "big.vmdk"
    result = write_vmdk(raw, vmdk, workers=3)
    assert_qemu_reads_it_as(raw, "raw", vmdk)
    lbas, kinds = walk(vmdk)
    assert lbas == sorted(lbas) and lbas[-1] == (size - GRAIN) // SECTOR
    assert kinds.count(1) == result.grain_tables == 4  # only the tables that hold grains
    assert result.size < 5 * MiB


def test_output_does_not_depend_on_the_worker_count(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "d.raw", 40 * MiB, [(i * 3 * MiB + 123, os.urandom(700_000)) for i in range(12)])
    one, four = tmp_path / "one.vmdk", tmp_path / "four.vmdk"
    write_vmdk(raw, one, workers=1)
    write_vmdk(raw, four, workers=4)
    # the descriptor names the file, so compare what follows the name-dependent head
    assert one.read_bytes()[2048:] == four.read_bytes()[2048:]


def test_level_changes_size_not_content(tmp_path: Path) -> None:
    text = b"".join(b"line %d of a log file with some words in it\n" % i for i in range(200_000))
    raw = make_raw(tmp_path / "t.raw", 32 * MiB, [(0, text)])
    fast, small = tmp_path / "fast.vmdk", tmp_path / "small.vmdk"
    write_vmdk(raw, fast, level=1)
    write_vmdk(raw, small, level=9)
    assert small.stat().st_size < fast.stat().st_size
    for vmdk in (fast, small):
        assert_qemu_reads_it_as(raw, "raw", vmdk)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"level": 0}, "level 0 is not allowed"),
    ({"level": 10}, "level 10 is not allowed"),
    ({"workers": -1}, "workers -1 is not allowed"),
])
def test_bad_settings_are_refused(kwargs: dict[str, int], message: str, tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "d.raw", MiB, [])
    with pytest.raises(ExportError, match=message):
        write_vmdk(raw, tmp_path / "d.vmdk", **kwargs)


def test_compressed_qcow2_under_an_overlay_is_decompressed_once_and_written_in_parallel(
    tmp_path: Path, small_disk: Path, make_cfg: Callable[..., ApplianceConfig], monkeypatch: pytest.MonkeyPatch,
    ovf_schema_dir: Path,
) -> None:
    # What a Vagrant box gives: a compressed qcow2 base, the VM's uncompressed overlay on top.
    base = tmp_path / "box.qcow2"
    run(["qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", str(small_disk), str(base)])
    top = tmp_path / "vm.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.name, str(top)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 2M 1M", "-c", "write -P 0x78 50M 3M", str(top)])
    layout = source_layout(top)
    assert [Path(layout.files[d]).name for d in layout.compressed_files] == ["box.qcow2"]
    warnings: list[str] = []
    monkeypatch.setattr(ova_module.log, "warning", lambda msg, *a: warnings.append(msg))
    out = tmp_path / "out"
    result = write_ova(top, make_cfg(), out / "vm.ova")
    assert warnings == []  # no fallback
    assert sorted(p.name for p in out.iterdir()) == ["vm.ova", "vm.ova.sha256"]  # scratch copy removed
    verify_ova(result.path, boot=False, schema_dir=ovf_schema_dir)
    run(["tar", "-xf", str(result.path), "-C", str(tmp_path)])
    assert_qemu_reads_it_as(top, "qcow2", tmp_path / "vm-disk001.vmdk")


def test_external_data_file_is_unsupported_and_write_ova_falls_back_saying_so(
    tmp_path: Path, make_cfg: Callable[..., ApplianceConfig], monkeypatch: pytest.MonkeyPatch,
    ovf_schema_dir: Path,
) -> None:
    disk = tmp_path / "ext.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.data'}", str(disk), "32M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 1M 2M", str(disk)])
    with pytest.raises(UnsupportedSource, match="external data file"):
        source_layout(disk)
    warnings: list[str] = []
    monkeypatch.setattr(ova_module.log, "warning", lambda msg, *a: warnings.append(msg))
    result = write_ova(disk, make_cfg(), tmp_path / "out" / "fallback.ova")
    assert len(warnings) == 1 and "qemu-img instead of the parallel writer" in warnings[0]
    assert "external data file" in warnings[0]
    verify_ova(result.path, boot=False, schema_dir=ovf_schema_dir)
    run(["tar", "-xf", str(result.path), "-C", str(tmp_path)])
    assert_qemu_reads_it_as(disk, "qcow2", tmp_path / "fallback-disk001.vmdk")


def test_a_vmdk_source_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    vmdk = tmp_path / "in.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "16M"])
    with pytest.raises(UnsupportedSource, match="is vmdk"):
        source_layout(vmdk)


def test_ova_from_the_parallel_writer_passes_verify_and_is_reproducible(
    tmp_path: Path, small_disk: Path, make_cfg: Callable[..., ApplianceConfig], ovf_schema_dir: Path
) -> None:
    # One tar mtime for both: the default (the build time) differs when the two writes straddle a second.
    first = write_ova(small_disk, make_cfg(), tmp_path / "a" / "x.ova", mtime=1_700_000_000)
    second = write_ova(small_disk, make_cfg("output.vmdk_workers=1"), tmp_path / "b" / "x.ova", mtime=1_700_000_000)
    assert first.sha256 == second.sha256  # same bytes whatever the worker count
    report = verify_ova(first.path, boot=False, schema_dir=ovf_schema_dir)
    assert report.ovf_format == "ovf10"
    run(["tar", "-xf", str(first.path), "-C", str(tmp_path)])
    assert_qemu_reads_it_as(small_disk, "qcow2", tmp_path / "x-disk001.vmdk")


def test_descriptor_padding_keeps_the_vmdk_where_it_was_written(
    tmp_path: Path, small_disk: Path, make_cfg: Callable[..., ApplianceConfig], monkeypatch: pytest.MonkeyPatch,
    ovf_schema_dir: Path,
) -> None:
    # A size bound with 600 digits reserves at least one block more than the real descriptor
    # needs: the descriptor is then padded, and the archive must still be whole.
    monkeypatch.setattr(ova_module, "max_vmdk_size", lambda layout, name: 10**600)
    result = write_ova(small_disk, make_cfg(), tmp_path / "p.ova")
    verify_ova(result.path, boot=False, schema_dir=ovf_schema_dir)
    run(["tar", "-xf", str(result.path), "-C", str(tmp_path)])
    ovf = (tmp_path / "p.ovf").read_bytes()
    assert ovf.rstrip(b"\n").endswith(b"</Envelope>") and ovf.endswith(b"\n\n") and len(ovf) % SECTOR == 1
    assert_qemu_reads_it_as(small_disk, "qcow2", tmp_path / "p-disk001.vmdk")


def test_size_bound_is_an_upper_bound(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "r.raw", 16 * MiB, [(0, os.urandom(5 * MiB))])
    vmdk = tmp_path / "r.vmdk"
    result = write_vmdk(raw, vmdk)
    assert vmdk_module.max_vmdk_size(source_layout(raw), vmdk.name) >= result.size


def test_qemu_img_remains_selectable(
    tmp_path: Path, small_disk: Path, make_cfg: Callable[..., ApplianceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the parallel writer must not run")

    monkeypatch.setattr(ova_module, "write_stream_vmdk", forbidden)
    result = write_ova(small_disk, make_cfg("output.vmdk_writer=qemu-img"), tmp_path / "q.ova")
    assert result.disk.file_size > 0


def test_a_read_failure_midway_leaves_no_partial_ova(
    tmp_path: Path, make_cfg: Callable[..., ApplianceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = make_raw(tmp_path / "d.raw", 64 * MiB, [(i * 4 * MiB, os.urandom(MiB)) for i in range(16)])
    real = vmdk_module._read_and_compress
    calls: list[int] = []

    def fail_on_the_fifth(*args: object) -> list[tuple[int, bytes]]:
        calls.append(1)
        if len(calls) == 5:
            raise ExportError("short read: 0 of 65536 bytes (simulated)")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(vmdk_module, "_read_and_compress", fail_on_the_fifth)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="simulated"):
        write_ova(raw, make_cfg(), out / "broken.ova")
    assert list(out.iterdir()) == []


def test_without_libdeflate_python_zlib_writes_the_same_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = make_raw(tmp_path / "z.raw", 24 * MiB, [(MiB, os.urandom(MiB)), (9 * MiB, b"zlib " * 90000)])
    with_libdeflate = write_vmdk(raw, tmp_path / "a.vmdk")
    monkeypatch.setattr(vmdk_module, "_libdeflate", None)
    with_zlib = write_vmdk(raw, tmp_path / "b.vmdk")
    assert with_libdeflate.grains == with_zlib.grains
    assert_qemu_reads_it_as(raw, "raw", tmp_path / "b.vmdk")
