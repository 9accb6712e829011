"""build/state.json read strictly, the two digests, and a sealed VM that stays sealed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, load_config
from appliance.errors import StateError, VagrantError, VMSealed
from appliance.pipeline import STAGE_NAMES, STAGES, BuildContext, Stage, StageOutcome, build_ova
from appliance.state import NOT_DISK_CONTENT, NOT_EXPORTED, BuildState, config_digest, export_digest

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, *sets: str) -> ApplianceConfig:
    return load_config(None, ["provider=libvirt", f"output.build_dir={tmp_path / 'build'}",
                              f"output.dir={tmp_path / 'dist'}", *sets], cwd=tmp_path)


# -- state.json ------------------------------------------------------------------------------


def test_missing_state_is_a_fresh_build(tmp_path: Path) -> None:
    assert BuildState.load(tmp_path) == BuildState()


def test_state_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    state = BuildState(sealed=True, seal_started=True, completed=["up"], images=[{"ref": "a"}])
    state.save(tmp_path)
    assert BuildState.load(tmp_path) == state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_save_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    # The old writer used the fixed name state.json.tmp: a symlink there redirected the write.
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "state.json.tmp").symlink_to(victim)
    BuildState(vm_name="x").save(tmp_path)
    assert victim.read_text() == "precious\n"
    assert BuildState.load(tmp_path).vm_name == "x"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"version": 1, "sealed": tr', "not valid JSON (truncated?)"),
        ("", "not valid JSON"),
        ('{"version": 1, "sealed": "no"}', "sealed is 'no', which is not of type bool"),
        ('{"version": 1, "sealed": 0}', "sealed is 0, which is not of type bool"),
        ('[1, 2]', "it holds a list, not an object"),
        ('{"version": 1, "completed": "up"}', "completed is 'up', which is not of type list[str]"),
        ('{"version": 1, "images": [{"ref": 3}]}', "images is"),
        ('{"version": 1, "verify_report": ["schema"]}', "verify_report is ['schema'], which is not of type dict"),
        ('{"version": 1, "seald": true}', "unknown field 'seald'"),
        ('{"version": 7}', "version is 7, this tool reads version 1"),
        ('{"version": true}', "version is True"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"version": 1, "sealed": false, "sealed": true}', "the field 'sealed' appears twice"),
    ],
)
def test_bad_state_is_refused_naming_file_and_fix(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(StateError) as info:
        BuildState.load(tmp_path)
    message = str(info.value)
    assert fragment in message and str(path) in message
    assert "invoke destroy" in message
    assert path.read_text() == text, "the file is kept as it was, for inspection"


def test_a_huge_state_file_is_refused_unread(tmp_path: Path) -> None:
    with (tmp_path / "state.json").open("wb") as f:
        f.write(b'{"version": 1, "sealed": true}')
        f.truncate(3 << 30)  # sparse
    with pytest.raises(StateError, match="is larger than 16777216 bytes"):
        BuildState.load(tmp_path)


def test_unreadable_state_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()
    with pytest.raises(StateError, match="cannot read the build state"):
        BuildState.load(tmp_path)


def test_cli_broken_state_exits_2_without_traceback(tmp_path: Path) -> None:
    build = tmp_path / "build"
    build.mkdir()
    (build / "state.json").write_text('{"version": 1, "sealed": "no"}')
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "up", "--provider", "libvirt", "--set", f"output.build_dir={build}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr  # hostile input, as the README says
    assert "state.json is not valid: sealed is 'no'" in proc.stderr and "Traceback" not in proc.stderr


# -- digests ---------------------------------------------------------------------------------


def test_every_excluded_setting_exists(tmp_path: Path) -> None:
    data = _cfg(tmp_path).model_dump()
    for dotted in (*NOT_DISK_CONTENT, *NOT_EXPORTED):
        node = data
        for part in dotted.split("."):
            assert part in node, dotted
            node = node[part]


@pytest.mark.parametrize("change", [
    "vm.boot_timeout=1800", "vm.verify_timeout=7200", "provision.step_timeout=7200", "provision.timeouts.k3s=600",
    "ssh.connect_retries=50", "artifacts.cache_dir=/tmp/other-cache", "provision.reconnect_attempts=5",
])
def test_waiting_and_caching_settings_change_neither_digest(tmp_path: Path, change: str) -> None:
    base, changed = _cfg(tmp_path), _cfg(tmp_path, change)
    assert config_digest(changed) == config_digest(base)
    assert export_digest(changed) == export_digest(base)


@pytest.mark.parametrize("change", [
    "k3s.version=v1.33.1+k3s1", "csghub.chart_version=2.5.0", "csghub.domain=hub.example.org",
    "csghub.values.global.x=1", "provision.skip={k3s,csghub}", "vm.disk_gb=100",
    "output.version=3.0.0",  # it reaches the guest (the first-boot config, the console)
])
def test_what_shapes_the_disk_changes_both_digests(tmp_path: Path, change: str) -> None:
    base, changed = _cfg(tmp_path), _cfg(tmp_path, change)
    assert config_digest(changed) != config_digest(base)
    assert export_digest(changed) != export_digest(base)


@pytest.mark.parametrize("change", [
    "output.product=Other", "output.vendor=Someone", "output.formats={virtualbox-ova-ovf20}", "output.description=New",
    "vm.cpus=6", "vm.memory_mb=32768", "virtualbox.nic_type=virtio",
])
def test_what_only_the_export_writes_changes_only_the_export_digest(tmp_path: Path, change: str) -> None:
    base, changed = _cfg(tmp_path), _cfg(tmp_path, change)
    assert config_digest(changed) == config_digest(base)
    assert export_digest(changed) != export_digest(base)


def test_eula_text_is_an_export_input(tmp_path: Path) -> None:
    eula = tmp_path / "eula.txt"
    eula.write_text("v1\n")
    before = export_digest(_cfg(tmp_path, f"output.eula_file={eula}"))
    eula.write_text("v2\n")
    assert export_digest(_cfg(tmp_path, f"output.eula_file={eula}")) != before


# -- the pipeline: sealed stays sealed, export redone when its inputs change ----------------------


class Recorder:
    def __init__(self, interrupt_at: str | None = None) -> None:
        self.ran: list[str] = []
        self.interrupt_at = interrupt_at

    def stages(self) -> list[Stage]:
        real = {s.name: s for s in STAGES}

        def make(name: str) -> Stage:
            def run(ctx: BuildContext) -> StageOutcome:
                if name == "seal":
                    # The real stage's bookkeeping around the seal, with the guest part stood in for.
                    if ctx.state.sealed:
                        return StageOutcome.skipped("already sealed")
                    ctx.state.seal_started = True
                    ctx.state.save(ctx.cfg.build_dir)
                if name == self.interrupt_at:
                    raise KeyboardInterrupt
                if name in ("up", "provision") and ctx.state.seal_begun:
                    return real[name].run(ctx)  # the real checks, before anything would boot
                self.ran.append(name)
                if name == "seal":
                    ctx.state.sealed = True
                return StageOutcome.done()

            return Stage(name, run, name)

        return [make(n) for n in STAGE_NAMES]


def test_timeout_change_keeps_a_sealed_vm(tmp_path: Path) -> None:
    build_ova(_cfg(tmp_path), stages=Recorder().stages())
    rec = Recorder()
    build_ova(_cfg(tmp_path, "vm.boot_timeout=3000", "provision.step_timeout=9000"), stages=rec.stages())
    assert BuildState.load(tmp_path / "build").sealed
    assert "up" not in rec.ran and "provision" not in rec.ran


def test_version_change_refuses_a_sealed_vm(tmp_path: Path) -> None:
    build_ova(_cfg(tmp_path), stages=Recorder().stages())
    with pytest.raises(VagrantError, match="sealed from a different configuration"):
        build_ova(_cfg(tmp_path, "k3s.version=v1.33.1+k3s1"), stages=Recorder().stages())


def test_output_change_reexports(tmp_path: Path) -> None:
    build_ova(_cfg(tmp_path), stages=Recorder().stages())
    first = BuildState.load(tmp_path / "build").export_digest
    build_ova(_cfg(tmp_path, "output.product=Renamed"), stages=Recorder().stages())
    state = BuildState.load(tmp_path / "build")
    assert state.sealed and state.export_digest != first
    assert state.export_digest == export_digest(_cfg(tmp_path, "output.product=Renamed"))


def test_interrupted_seal_is_recorded_and_never_resumed_as_unsealed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import vagrant
    from appliance.errors import Cancelled

    with pytest.raises(Cancelled):
        build_ova(_cfg(tmp_path), stages=Recorder(interrupt_at="seal").stages())
    state = BuildState.load(tmp_path / "build")
    assert state.seal_started and not state.sealed and state.seal_begun

    # The VM is off now: the rerun must refuse to boot it (the real `up` stage decides).
    class Off:
        running = False

    monkeypatch.setattr(vagrant, "status", lambda cfg, **kw: Off())
    booted: list[object] = []
    monkeypatch.setattr(vagrant, "up", lambda *a, **k: booted.append(a))
    with pytest.raises(VMSealed, match="seal step was interrupted") as info:
        build_ova(_cfg(tmp_path), stages=Recorder().stages())
    assert "invoke destroy" in str(info.value) and not booted


def test_up_and_provision_refuse_a_sealed_vm(tmp_path: Path) -> None:
    from appliance.steps import provision_vagrant_vm
    from appliance.vagrant import up

    cfg = _cfg(tmp_path)
    BuildState(sealed=True).save(cfg.build_dir)
    for action in (lambda: up(cfg, render_first=True), lambda: provision_vagrant_vm(cfg)):
        with pytest.raises(VMSealed) as info:
            action()
        assert "invoke destroy" in str(info.value) and "invoke build-ova" in str(info.value)
    assert not (cfg.build_dir / "vm").exists(), "nothing was rendered or started"
    BuildState(seal_started=True).save(cfg.build_dir)
    with pytest.raises(VMSealed, match="was being sealed") as info:
        up(cfg)
    # An interrupted seal is not exported as it is: the build reruns the seal while the VM runs.
    assert "runs the seal step again" in str(info.value) and "exports the sealed VM" not in str(info.value)


def test_cli_up_on_a_sealed_vm_exits_1(tmp_path: Path) -> None:
    build = tmp_path / "build"
    BuildState(sealed=True).save(build)
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "up", "--provider", "libvirt", "--set", f"output.build_dir={build}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "refusing to boot the VM: the build VM is sealed" in proc.stderr
    assert "invoke destroy" in proc.stderr and "Traceback" not in proc.stderr


def test_state_json_holds_seal_started(tmp_path: Path) -> None:
    BuildState(seal_started=True).save(tmp_path)
    assert json.loads((tmp_path / "state.json").read_text())["seal_started"] is True


def test_provision_only_seal_records_the_seal_like_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`invoke provision --only seal` left state.json saying "not sealed": `invoke up` then booted the sealed
    VM and its first boot ran inside the build VM. The guest part is stood in for; the books are real."""
    from appliance import steps, vagrant

    cfg = _cfg(tmp_path)
    seen: list[tuple[bool, bool]] = []

    def guest_step(cfg: ApplianceConfig, endpoint: object, options: steps.Options, **kwargs: object) -> str:
        state = BuildState.load(cfg.build_dir)
        seen.append((state.seal_started, state.sealed))  # what a Ctrl-C right now would leave
        if options.only == "seal" and len(seen) == 2:
            raise KeyboardInterrupt
        return "sealed"

    monkeypatch.setattr(vagrant, "ssh_config", lambda cfg, **kw: object())
    monkeypatch.setattr(steps, "pinned_uploads", lambda cfg, skip=(): [])
    monkeypatch.setattr(steps, "provision", guest_step)
    assert steps.provision_vagrant_vm(cfg, steps.Options(only="firstboot")) == "sealed"
    assert seen == [(False, False)] and not BuildState.load(cfg.build_dir).seal_begun, "other steps keep no books"
    with pytest.raises(KeyboardInterrupt):
        steps.provision_vagrant_vm(cfg, steps.Options(only="seal"))
    state = BuildState.load(cfg.build_dir)
    assert seen[1] == (True, False) and state.seal_started and not state.sealed
    with pytest.raises(VMSealed, match="was being sealed"):
        vagrant.up(cfg)
    BuildState().save(cfg.build_dir)
    assert steps.provision_vagrant_vm(cfg, steps.Options(only="seal")) == "sealed"
    state = BuildState.load(cfg.build_dir)
    assert state.sealed and state.config_digest == config_digest(cfg)
    with pytest.raises(VMSealed, match="the build VM is sealed"):
        vagrant.up(cfg)
