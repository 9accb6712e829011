"""Publishing as a set (all or none), and a full disk or Ctrl-C in export and publish.

The disk-full cases write into small tmpfs mounts the tests make (root needed, as in
test_artifacts.py); the OVA writer and qemu-img run for real.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import publish
from appliance.config import ApplianceConfig, load_config
from appliance.errors import Cancelled, HostFileError, UsageError, VerifyError
from appliance.export.ova import write_ova
from appliance.pipeline import BuildContext, Stage, StageOutcome, build_ova, stage_publish
from appliance.publish import PublishedFile, publish_set
from appliance.run import run
from appliance.state import BuildState
from tests.staged import stage_verified_ova

MiB = 2**20


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    mounts: list[Path] = []
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("disk-full simulation mounts a small tmpfs, which needs root")

    def make(size: int) -> Path:
        mount = tmp_path / f"tmpfs{len(mounts)}"
        mount.mkdir()
        done = run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=False)
        if not done.ok:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(mount)
        return mount

    try:
        yield make
    finally:
        for mount in mounts:
            run(["umount", str(mount)], check=False)


def _cfg(tmp_path: Path, dist: Path, *sets: str) -> ApplianceConfig:
    return load_config(None, ["provider=libvirt", f"output.build_dir={tmp_path / 'build'}", f"output.dir={dist}",
                              "output.version=1.0.0", *sets], cwd=tmp_path)


def _stage_an_ova(cfg: ApplianceConfig, size: int) -> BuildState:
    """A verified staged OVA (a real one, ``size`` random bytes on its disk) recorded in state.json."""
    return stage_verified_ova(cfg, cfg.build_dir / "staging" / "csghub-1.0.0.ova", size)


def _publish_only(cfg: ApplianceConfig, state: BuildState, **options: object) -> BuildContext:
    from appliance.pipeline import BuildOptions
    from appliance.state import config_digest

    state.config_digest = config_digest(cfg)
    state.save(cfg.build_dir)
    return build_ova(cfg, BuildOptions(**options),  # type: ignore[arg-type]
                     stages=[Stage("publish", stage_publish, "publish")])


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- publish_set --------------------------------------------------------------------------------


def test_disk_full_while_publishing_leaves_nothing(tmpfs: Callable[[int], Path], tmp_path: Path) -> None:
    dist = tmpfs(1 * MiB)
    source = tmp_path / "big.ova"
    source.write_bytes(os.urandom(2 * MiB))
    with pytest.raises(OSError) as info:
        publish_set(dist, [PublishedFile("a.ova", source=source), PublishedFile("a.ova.sha256", data=b"x\n")])
    assert info.value.errno == errno.ENOSPC
    assert _listing(dist) == []


def test_ctrl_c_during_the_renames_completes_the_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    for name, text in (("a.ova", "old ova"), ("a.ova.sha256", "old digest"), ("build-report.json", "old report")):
        (dist / name).write_text(text)
    real_replace = os.replace
    calls: list[str] = []

    def replace_then_ctrl_c(src: str, dst: str) -> None:
        calls.append(str(dst))
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C right after the first rename begins
        real_replace(src, dst)

    monkeypatch.setattr(publish.os, "replace", replace_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        publish_set(dist, [PublishedFile("a.ova", data=b"new ova"), PublishedFile("a.ova.sha256", data=b"new digest"),
                           PublishedFile("build-report.json", data=b"new report")])
    assert len(calls) == 3, "the interrupt waited for the whole set"
    assert [(dist / n).read_text() for n in ("a.ova", "a.ova.sha256", "build-report.json")] == [
        "new ova", "new digest", "new report"]
    assert _listing(dist) == ["a.ova", "a.ova.sha256", "build-report.json"]


def test_a_leftover_from_a_hard_kill_is_cleared(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / ".a.ova.k3j2h1.partial").write_text("half")
    (dist / ".other.ova.x.partial").write_text("not ours")
    publish_set(dist, [PublishedFile("a.ova", data=b"ova")])
    assert _listing(dist) == [".other.ova.x.partial", "a.ova"]
    assert (dist / "a.ova").stat().st_mode & 0o777 == 0o644


# -- the publish stage through the runner -----------------------------------------------------------


def test_publish_refuses_early_when_space_is_short(tmpfs: Callable[[int], Path], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tmpfs(1 * MiB))
    with pytest.raises(HostFileError, match=r"not enough space in .* for publishing csghub-1.0.0.ova") as info:
        _publish_only(cfg, _stage_an_ova(cfg, 2 * MiB))
    assert info.value.exit_code == 1
    assert BuildState.load(cfg.build_dir).last_failure.startswith("publish: not enough space")
    assert _listing(cfg.dist_dir) == []


def test_publish_disk_full_is_a_clear_error_and_recorded(tmpfs: Callable[[int], Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the early check (space can go between the check and the copy): the real ENOSPC.
    monkeypatch.setattr(publish, "check_free_space", lambda *a: None)
    cfg = _cfg(tmp_path, tmpfs(1 * MiB))
    with pytest.raises(HostFileError) as info:
        _publish_only(cfg, _stage_an_ova(cfg, 2 * MiB))
    assert "stage 'publish' failed: no space left on the device" in info.value.message
    assert re.search(r"\d(\.\d)? (B|KiB|MiB) are free in", info.value.message) and info.value.exit_code == 1
    assert BuildState.load(cfg.build_dir).last_failure.startswith("publish: stage 'publish' failed: no space left")
    assert _listing(cfg.dist_dir) == []


def test_forced_republish_interrupted_keeps_the_old_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, tmp_path / "dist")
    _publish_only(cfg, _stage_an_ova(cfg, 64 * 1024))
    before = {n: (cfg.dist_dir / n).read_bytes() for n in _listing(cfg.dist_dir)}
    assert sorted(before) == ["build-report.json", "csghub-1.0.0.ova", "csghub-1.0.0.ova.sha256"]

    def half_then_ctrl_c(out: object, f: PublishedFile) -> None:
        out.write(b"half an OVA")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(publish, "_fill", half_then_ctrl_c)  # while the new OVA is being written
    with pytest.raises(Cancelled) as info:
        _publish_only(cfg, _stage_an_ova(cfg, 64 * 1024), force=True)
    monkeypatch.undo()
    assert info.value.exit_code == 130
    assert {n: (cfg.dist_dir / n).read_bytes() for n in _listing(cfg.dist_dir)} == before
    digest, name = before["csghub-1.0.0.ova.sha256"].decode().split()
    assert hashlib.sha256(before[name]).hexdigest() == digest
    assert BuildState.load(cfg.build_dir).last_failure == "interrupted during publish"


def test_forced_republish_replaces_the_whole_set(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tmp_path / "dist")
    _publish_only(cfg, _stage_an_ova(cfg, 4096))
    state = _stage_an_ova(cfg, 8192)
    _publish_only(cfg, state, force=True)
    dist = cfg.dist_dir
    assert (dist / "csghub-1.0.0.ova.sha256").read_text().split()[0] == state.staged_ova_sha256
    assert hashlib.sha256((dist / "csghub-1.0.0.ova").read_bytes()).hexdigest() == state.staged_ova_sha256
    assert json.loads((dist / "build-report.json").read_text())["ova"]["sha256"] == state.staged_ova_sha256


def test_a_staged_ova_changed_after_verify_is_not_published(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tmp_path / "dist")
    state = _stage_an_ova(cfg, 4096)
    Path(state.staged_ova).write_bytes(b"tampered")
    with pytest.raises(VerifyError, match="does not pass the structural check at publish"):
        _publish_only(cfg, state)
    assert _listing(cfg.dist_dir) == []


def test_a_forged_state_does_not_publish(tmp_path: Path) -> None:
    """Issue 21: a well-typed state.json naming a sound OVA with its real sha256, "verified", but not
    written by this tool's verify stage (no receipt, or a receipt for other facts), publishes nothing."""
    cfg = _cfg(tmp_path, tmp_path / "dist")
    forged = stage_verified_ova(cfg, cfg.build_dir / "staging" / "csghub-1.0.0.ova", verified=False)
    forged.verified_sha256 = forged.staged_ova_sha256  # what the forger writes
    forged.verify_report = {"checks": {"boot": "checked"}}
    for receipt_value in ("", "0" * 64, stage_verified_ova(cfg, tmp_path / "other" / "x.ova").verify_receipt):
        forged.verify_receipt = receipt_value
        with pytest.raises(UsageError, match="carries no receipt of this tool's verify stage"):
            _publish_only(cfg, forged)
        assert not cfg.dist_dir.exists() or _listing(cfg.dist_dir) == []
    # The same OVA with the receipt the verify stage issues publishes, and the report says verified.
    from appliance import receipt

    forged.verify_receipt = receipt.issue(forged.staged_ova_sha256, forged.export_digest, forged.verify_report)
    _publish_only(cfg, forged)
    assert json.loads((cfg.dist_dir / "build-report.json").read_text())["ova"]["verified"] is True



def test_a_staged_ova_exported_with_other_output_settings_is_not_published(tmp_path: Path) -> None:
    """Issue 12 item 3 by another door: `--skip export` (or `--only publish`) after an output setting
    changed would publish the old OVA (old product in its descriptor) with a report of the new config."""
    from appliance.pipeline import STAGES, BuildOptions

    cfg = _cfg(tmp_path, tmp_path / "dist")
    state = _stage_an_ova(cfg, 4096)
    state.sealed, state.completed = True, ["export", "verify"]
    renamed = _cfg(tmp_path, tmp_path / "dist", "output.product=Renamed")
    tail = [s for s in STAGES if s.name in ("export", "verify", "publish")]
    for options in (BuildOptions(skip=("export",)), BuildOptions(only=("publish",))):
        _publish_only(cfg, state)  # records this config's digests, then saves (publishing for real is fine)
        for name in _listing(cfg.dist_dir):
            (cfg.dist_dir / name).unlink()
        with pytest.raises(UsageError, match="exported with other output settings") as info:
            build_ova(renamed, options, stages=tail)
        assert "without --skip export" in (info.value.hint or "")
        assert _listing(cfg.dist_dir) == []


# -- export on a full disk ----------------------------------------------------------------------------


def test_export_disk_full_is_a_clear_error_and_recorded(tmpfs: Callable[[int], Path], tmp_path: Path) -> None:
    # Random data does not compress: an OVA holding 6 MiB of it cannot fit in 5 MiB, whichever writer made the
    # VMDK (the parallel writer streams it into the OVA; qemu-img writes it beside the OVA first).
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(6 * MiB))
    staging = tmpfs(5 * MiB)
    cfg = _cfg(tmp_path, tmp_path / "dist")

    def export(ctx: BuildContext) -> StageOutcome:
        write_ova(raw, ctx.cfg, staging / "csghub-1.0.0.ova")
        return StageOutcome.done()

    with pytest.raises(HostFileError) as info:
        build_ova(cfg, stages=[Stage("export", export, "export")])
    assert "stage 'export' failed: no space left on the device" in info.value.message, info.value.message
    assert info.value.exit_code == 1
    assert BuildState.load(cfg.build_dir).last_failure.startswith("export: stage 'export' failed: no space left")
    assert _listing(staging) == [], "no partial OVA, digest or work folder is left"


@pytest.mark.parametrize(("writer", "hook"), [("parallel", "write_stream_vmdk"), ("qemu-img", "_write_file_member")])
def test_ctrl_c_while_packing_the_ova_leaves_nothing_and_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     writer: str, hook: str) -> None:
    from appliance.export import ova

    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(MiB))
    staging = tmp_path / "staging"
    cfg = _cfg(tmp_path, tmp_path / "dist", f"output.vmdk_writer={writer}")
    real = getattr(ova, hook)

    def interrupted(*args: object, **kwargs: object) -> object:
        real(*args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C once the disk is packed, before the end of the archive

    monkeypatch.setattr(ova, hook, interrupted)

    def export(ctx: BuildContext) -> StageOutcome:
        write_ova(raw, ctx.cfg, staging / "csghub-1.0.0.ova")
        return StageOutcome.done()

    with pytest.raises(Cancelled) as info:
        build_ova(cfg, stages=[Stage("export", export, "export")])
    assert info.value.exit_code == 130
    assert BuildState.load(cfg.build_dir).last_failure == "interrupted during export"
    assert _listing(staging) == []


# -- the real command, a real signal ------------------------------------------------------------------


def _cli_publish(tmp_path: Path, dist: Path) -> list[str]:
    from appliance.config import PROJECT_ROOT

    return [sys.executable, "-m", "invoke", "-r", str(PROJECT_ROOT), "build-ova", "--provider", "libvirt",
            "--only", "publish", "--set", f"output.build_dir={tmp_path / 'build'}", "--set", f"output.dir={dist}",
            "--set", "output.version=1.0.0", "--set", "output.vmdk_compression_level=1"]


def _stage_for_the_cli(tmp_path: Path, dist: Path, size: int) -> ApplianceConfig:
    from appliance.state import config_digest

    # Level 1: the big, incompressible disks these tests need are written (and re-checked) fastest.
    cfg = _cfg(tmp_path, dist, "output.vmdk_compression_level=1")
    state = _stage_an_ova(cfg, size)
    state.config_digest = config_digest(cfg)
    state.save(cfg.build_dir)
    return cfg


def test_cli_ctrl_c_while_publishing_exits_130_and_leaves_nothing(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    cfg = _stage_for_the_cli(tmp_path, dist, 256 * MiB)
    proc = subprocess.Popen(_cli_publish(tmp_path, dist), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (dist.is_dir() and any(p.name.endswith(".partial") for p in dist.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "publishing ended before Ctrl-C could come"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # Ctrl-C while the OVA is being copied
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted during stage 'publish'" in err and "Traceback" not in err
    assert _listing(dist) == [], "no .partial and no part of the set is left"
    assert BuildState.load(cfg.build_dir).last_failure == "interrupted during publish"


def test_cli_publish_to_a_full_disk_exits_1_naming_the_space(tmpfs: Callable[[int], Path], tmp_path: Path) -> None:
    dist = tmpfs(1 * MiB)
    cfg = _stage_for_the_cli(tmp_path, dist, 2 * MiB)
    proc = subprocess.run(_cli_publish(tmp_path, dist), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"not enough space in {dist}" in proc.stderr and "Traceback" not in proc.stderr
    assert _listing(dist) == []
    assert BuildState.load(cfg.build_dir).last_failure.startswith("publish: not enough space")


def test_the_report_records_publish_as_done_with_the_copy_in_its_time(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The report is written by the publish stage: it used to list that stage as "running". It is made once
    the OVA and its digest are written, and records publish as ok with the time the copy took."""
    cfg = _cfg(tmp_path, tmp_path / "dist")
    real_fill = publish._fill
    slow = 0.4

    def slow_copy(out: object, f: PublishedFile) -> None:
        if f.source is not None:  # the OVA: a slow disk
            time.sleep(slow)
        real_fill(out, f)  # type: ignore[arg-type]

    monkeypatch.setattr(publish, "_fill", slow_copy)
    _publish_only(cfg, _stage_an_ova(cfg, 4096))
    report = json.loads((cfg.dist_dir / "build-report.json").read_text())
    assert all(stage["outcome"] != "running" for stage in report["stages"]), report["stages"]
    entry = report["stages"][-1]
    assert entry["name"].startswith("publish") and entry["outcome"] == "ok", entry
    assert entry["seconds"] >= slow and entry["end"] >= entry["start"], entry
