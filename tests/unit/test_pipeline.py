"""The build-ova runner: stage order, resume, failure and Ctrl-C handling, publishing rules.

Stages are replaced by recording stand-ins with the real names; publishing runs for real
on files in a temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, load_config
from appliance.errors import ApplianceError, Cancelled, UsageError, VagrantError
from appliance.log import log
from appliance.pipeline import (
    STAGE_NAMES,
    STAGES,
    BuildContext,
    BuildOptions,
    Stage,
    StageOutcome,
    build_ova,
    plan_config,
    stage_publish,
)
from appliance.state import BuildState
from tests.staged import stage_verified_ova


def _cfg(tmp_path: Path, *sets: str) -> ApplianceConfig:
    return load_config(None, ["provider=libvirt", f"output.build_dir={tmp_path / 'build'}",
                              f"output.dir={tmp_path / 'dist'}", *sets], cwd=tmp_path)


class Recorder:
    def __init__(self, fail_at: str | None = None, interrupt_at: str | None = None) -> None:
        self.ran: list[str] = []
        self.fail_at, self.interrupt_at = fail_at, interrupt_at

    def stages(self) -> list[Stage]:
        def make(name: str) -> Stage:
            def run(ctx: BuildContext) -> StageOutcome:
                self.ran.append(name)
                if name == self.fail_at:
                    raise ApplianceError(f"{name} broke")
                if name == self.interrupt_at:
                    raise KeyboardInterrupt
                if name == "seal":
                    ctx.state.sealed = True
                return StageOutcome.done()

            return Stage(name, run, name)

        return [make(s.name) for s in STAGES]


def test_stages_run_in_declared_order(tmp_path: Path) -> None:
    rec = Recorder()
    build_ova(_cfg(tmp_path), stages=rec.stages())
    assert rec.ran == STAGE_NAMES
    state = BuildState.load(tmp_path / "build")
    assert state.completed == STAGE_NAMES and state.sealed


def test_failure_keeps_state_and_rerun_resumes(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    rec = Recorder(fail_at="export")
    with pytest.raises(ApplianceError, match="export broke"):
        build_ova(cfg, stages=rec.stages())
    state = BuildState.load(tmp_path / "build")
    assert state.completed == STAGE_NAMES[: STAGE_NAMES.index("export")]
    assert state.last_failure.startswith("export: export broke")
    assert state.sealed
    rec2 = Recorder()
    build_ova(cfg, stages=rec2.stages())
    assert BuildState.load(tmp_path / "build").completed == STAGE_NAMES


def test_ctrl_c_is_cancelled_with_resume_hint(tmp_path: Path) -> None:
    rec = Recorder(interrupt_at="provision")
    with pytest.raises(Cancelled) as info:
        build_ova(_cfg(tmp_path), stages=rec.stages())
    assert info.value.exit_code == 130
    assert "interrupted during stage 'provision'" in str(info.value) and "resume" in str(info.value)
    assert BuildState.load(tmp_path / "build").last_failure == "interrupted during provision"


def test_sealed_vm_refuses_a_changed_config(tmp_path: Path) -> None:
    build_ova(_cfg(tmp_path), stages=Recorder().stages())
    with pytest.raises(VagrantError, match="sealed from a different configuration") as info:
        build_ova(_cfg(tmp_path, "k3s.version=v1.33.1+k3s1"), stages=Recorder().stages())
    assert "invoke destroy" in str(info.value)


def test_skip_only_split_stages_and_steps(tmp_path: Path) -> None:
    _, stages = plan_config(_cfg(tmp_path), BuildOptions(skip=("verify",)))
    assert "verify" not in stages and "export" in stages
    with pytest.raises(UsageError, match="unknown stage or step: nonsense; stages: fetch, base-box, render"):
        plan_config(_cfg(tmp_path), BuildOptions(skip=("nonsense",)))


def test_skipped_stage_is_reported_not_run(tmp_path: Path) -> None:
    rec = Recorder()
    build_ova(_cfg(tmp_path), BuildOptions(skip=("fetch", "verify")), stages=rec.stages())
    assert "fetch" not in rec.ran and "verify" not in rec.ran and "publish" in rec.ran


def test_stage_outcomes_are_recorded_as_the_stages_report_them(tmp_path: Path) -> None:
    """A stage's own ``skipped`` outcome and a ``--skip`` both show as skipped; a note alone does not."""
    stages = Recorder().stages()
    answers = {"fetch": StageOutcome.skipped("nothing to fetch"), "render": StageOutcome.done("skipped nothing")}
    stages = [Stage(s.name, (lambda ctx, a=answers[s.name]: a) if s.name in answers else s.run, s.help)
              for s in stages]
    first = len(log.timings)
    build_ova(_cfg(tmp_path), BuildOptions(skip=("verify",)), stages=stages)
    outcomes = {t.name.split(":")[0]: t.outcome for t in log.timings[first:]}
    assert outcomes == {name: "skipped" if name in ("fetch", "verify") else "ok" for name in STAGE_NAMES}


def _staged(tmp_path: Path, cfg: ApplianceConfig, verified: bool = True) -> BuildContext:
    state = stage_verified_ova(cfg, tmp_path / "build" / "staging" / "x.ova", verified=verified)
    return BuildContext(cfg=cfg, options=BuildOptions(), state=state)


def test_publish_writes_ova_digest_and_report(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "output.version=9.9.9")
    ctx = _staged(tmp_path, cfg)
    stage_publish(ctx)
    dist = tmp_path / "dist"
    ova = dist / "csghub-9.9.9.ova"
    assert ova.read_bytes() == Path(ctx.state.staged_ova).read_bytes()
    assert (dist / "csghub-9.9.9.ova.sha256").read_text() == f"{ctx.state.staged_ova_sha256}  csghub-9.9.9.ova\n"
    report = json.loads((dist / "build-report.json").read_text())
    assert report["ova"]["sha256"] == ctx.state.staged_ova_sha256 and report["ova"]["verified"] is True
    assert report["config"]["vm"]["cpus"] == cfg.vm.cpus
    names = sorted(p.name for p in dist.iterdir())
    assert names == ["build-report.json", "csghub-9.9.9.ova", "csghub-9.9.9.ova.sha256"]


def test_publish_refuses_overwrite_without_force(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "output.version=1.0")
    ctx = _staged(tmp_path, cfg)
    (tmp_path / "dist").mkdir()
    existing = tmp_path / "dist" / "csghub-1.0.ova"
    existing.write_bytes(b"precious")
    with pytest.raises(UsageError, match="pass --force"):
        stage_publish(ctx)
    assert existing.read_bytes() == b"precious"
    ctx.options = BuildOptions(force=True)
    stage_publish(ctx)
    assert existing.read_bytes() != b"precious"


def test_publish_refuses_unverified_ova(tmp_path: Path) -> None:
    ctx = _staged(tmp_path, _cfg(tmp_path), verified=False)
    with pytest.raises(UsageError, match="not passed verification"):
        stage_publish(ctx)
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_the_base_box_stage_can_be_skipped_by_name(tmp_path: Path) -> None:
    _, stages = plan_config(_cfg(tmp_path), BuildOptions(skip=("base-box",)))
    assert "base-box" not in stages and stages.index("render") < stages.index("up")
    _, all_stages = plan_config(_cfg(tmp_path), BuildOptions())
    assert all_stages.index("base-box") < all_stages.index("render")  # the KVM probe boots the box's kernel
