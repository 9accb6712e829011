"""The step runner against a real loopback sshd, with throwaway provision directories.

Markers go to a temporary state directory and scripts to a temporary guest directory, so
nothing is written under /var/lib or /var/tmp of the machine running the tests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sshd_server import SSHServer

from appliance.config import ApplianceConfig, load_config
from appliance.errors import StepFailed, UsageError
from appliance.needs import GuestUpload
from appliance.scripts import discover_scripts
from appliance.ssh import RemoteSession
from appliance.steps import Options, Provisioner, describe_plan


def sh(*lines: str, header: tuple[str, ...] = ()) -> str:
    """A bash step script: shebang, header comments, strict mode, then ``lines``."""
    return "\n".join(["#!/usr/bin/env bash", *(f"# appliance: {h}" for h in header), "set -euo pipefail", *lines, ""])


BASE = sh(
    'if [[ -e "$WORK/base.flag" ]]; then echo "ok: base flag present"; exit 0; fi',
    'touch "$WORK/base.flag"; echo "changed: base flag"',
)
MIDDLE = sh(
    'echo "middle runs" >&2',
    'if [[ -e "$WORK/fail-middle" ]]; then echo "changed: half of something"; echo "middle is broken" >&2; exit 7; fi',
    'echo "$K3S_VERSION" >> "$WORK/middle.runs"',
    'echo "ok: middle"',
    header=("env=K3S_VERSION",),
)
LAST = sh('echo "run" >> "$WORK/last.runs"', 'echo "changed: last"')


def _runs(work: Path, name: str) -> int:
    path = work / f"{name}.runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


class Rig:
    """A provision directory, a work directory the scripts write into, and a way to run them."""

    def __init__(self, tmp_path: Path, session: RemoteSession) -> None:
        self.tmp = tmp_path
        self.session = session
        self.scripts = tmp_path / "provision"
        self.scripts.mkdir()
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.state = tmp_path / "state"
        self.guest = tmp_path / "guest"
        self.sets = [f"output.build_dir={tmp_path / 'build'}"]

    def write(self, filename: str, text: str) -> Path:
        path = self.scripts / filename
        # $WORK reaches the scripts through a tiny wrapper line: scripts get their inputs as env vars.
        path.write_text(text.replace("set -euo pipefail\n", f"set -euo pipefail\nWORK={self.work}\n", 1))
        return path

    def cfg(self, *extra: str) -> ApplianceConfig:
        steps = [s.name for s in discover_scripts(self.scripts)]
        return load_config(None, [*self.sets, *extra], "libvirt", step_names=steps)

    def provisioner(self, *extra: str) -> Provisioner:
        return Provisioner(
            self.cfg(*extra), self.session, directory=self.scripts, state_dir=str(self.state), guest_dir=str(self.guest)
        )

    def run(self, *extra: str, **options: object) -> dict[str, str]:
        report = self.provisioner(*extra).run(Options(**options))  # type: ignore[arg-type]
        return {s.name: s.outcome for s in report.steps}

    def plan(self, *extra: str, **options: object) -> dict[str, tuple[bool, str]]:
        planned = self.provisioner(*extra).plan(Options(**options))  # type: ignore[arg-type]
        return {p.name: (p.run, p.reason) for p in planned}


@pytest.fixture
def rig(tmp_path: Path, session: RemoteSession) -> Rig:
    r = Rig(tmp_path, session)
    r.write("10-base.sh", BASE)
    r.write("20-middle.sh", MIDDLE)
    r.write("30-last.sh", LAST)
    return r


def test_first_run_runs_all_then_a_rerun_skips_all(rig: Rig) -> None:
    assert rig.run() == {"base": "changed", "middle": "no changes", "last": "changed"}
    marker = json.loads((rig.state / "middle.done").read_text())
    assert marker["step"] == "middle"
    # Exactly what the step declares (plus PROVISION_DIR, which every step gets): no other setting.
    assert set(marker["inputs"]) == {"script", "env:K3S_VERSION", "env:PROVISION_DIR"}
    assert set(json.loads((rig.state / "base.done").read_text())["inputs"]) == {"script", "env:PROVISION_DIR"}
    assert all(len(v) == 64 for v in marker["inputs"].values()), "inputs are stored as sha256, not values"

    log_text = (rig.tmp / "build" / "logs" / "20-middle.log").read_text()
    assert "err] middle runs" in log_text and "out] ok: middle" in log_text

    plan = rig.plan()
    assert plan == {n: (False, "done, inputs unchanged") for n in ("base", "middle", "last")}
    assert rig.run() == {"base": "skipped", "middle": "skipped", "last": "skipped"}
    assert _runs(rig.work, "middle") == 1 and _runs(rig.work, "last") == 1


def test_changed_script_reruns_that_step_and_every_later_one(rig: Rig) -> None:
    rig.run()
    rig.write("20-middle.sh", MIDDLE + "# an edit\n")
    plan = rig.plan()
    assert plan["base"] == (False, "done, inputs unchanged")
    assert plan["middle"] == (True, "inputs changed: script")
    assert plan["last"] == (True, "follows middle, which runs")
    assert rig.run() == {"base": "skipped", "middle": "no changes", "last": "changed"}
    assert _runs(rig.work, "middle") == 2 and _runs(rig.work, "last") == 2


def test_changed_input_variable_is_named_and_reruns_from_the_first_step_declaring_it(rig: Rig) -> None:
    rig.run()
    plan = rig.plan("k3s.version=v1.30.0+k3s1")
    # base does not declare K3S_VERSION: untouched. middle does; last follows a step that reruns.
    assert plan == {
        "base": (False, "done, inputs unchanged"),
        "middle": (True, "inputs changed: env:K3S_VERSION"),
        "last": (True, "follows middle, which runs"),
    }
    assert rig.run("k3s.version=v1.30.0+k3s1") == {"base": "skipped", "middle": "no changes", "last": "changed"}
    assert (rig.work / "middle.runs").read_text().splitlines()[-1] == "v1.30.0+k3s1"
    # A setting no step declares changes nothing at all.
    assert rig.plan("k3s.version=v1.30.0+k3s1", "csghub.domain=example.test") == {
        n: (False, "done, inputs unchanged")
        for n in ("base", "middle", "last")}


def test_steps_receive_only_the_variables_they_declare(rig: Rig) -> None:
    rig.write("40-env.sh", sh('env | grep -E "^(APPLIANCE|CSGHUB|K3S|PROVISION)_?[A-Z_]*=" | cut -d= -f1 | sort '
                              '> "$WORK/env"', header=("env=CSGHUB_DOMAIN,K3S_NODE_IP",)))
    rig.run()
    seen = (rig.work / "env").read_text().split()
    # Besides its declared inputs a step carries only the runner's own process-group token (so that Ctrl-C
    # can find and stop the step's whole tree on the guest): a random per-run value, hashed into no marker.
    from appliance.ssh import GROUP_TOKEN_VAR

    assert [name for name in seen if name != GROUP_TOKEN_VAR] == ["CSGHUB_DOMAIN", "K3S_NODE_IP", "PROVISION_DIR"]


def test_failure_names_step_status_tail_and_log_then_resumes_there(rig: Rig) -> None:
    rig.run()
    rig.write("20-middle.sh", MIDDLE + "# changed so it runs again\n")
    (rig.work / "fail-middle").touch()
    with pytest.raises(StepFailed) as info:
        rig.run()
    message = str(info.value)
    log_path = rig.tmp / "build" / "logs" / "20-middle.log"
    assert info.value.step == "middle"
    assert "20-middle.sh failed with exit status 7 after 1 change(s)" in message
    assert "middle is broken" in message and "changed: half of something" in message
    assert str(log_path) in message and info.value.log_path == str(log_path)
    assert "middle is broken" in log_path.read_text()
    assert not (rig.state / "middle.done").exists()
    assert not (rig.state / "last.done").exists(), "later markers must be invalidated before a step runs"
    assert _runs(rig.work, "last") == 1, "the build must stop at the failed step"

    (rig.work / "fail-middle").unlink()
    plan = rig.plan()
    assert plan["base"][0] is False and plan["middle"] == (True, "not done yet (no marker)")
    assert rig.run() == {"base": "skipped", "middle": "no changes", "last": "changed"}


def test_timeout_from_the_script_header(rig: Rig) -> None:
    rig.write("40-slow.sh", sh("echo waiting", "sleep 60", header=("timeout=2",)))
    started = time.monotonic()
    with pytest.raises(StepFailed, match=r"40-slow\.sh timed out after 2 s") as info:
        rig.run()
    assert time.monotonic() - started < 30
    assert "provision.timeouts.slow" in str(info.value)


def test_config_timeout_beats_the_header(rig: Rig) -> None:
    rig.write("40-slow.sh", sh("sleep 60", header=("timeout=600",)))
    with pytest.raises(StepFailed, match="timed out after 10 s"):
        rig.run("provision.timeouts={slow: 10}")


def test_only_from_force_skip_and_their_errors(rig: Rig) -> None:
    rig.run()
    assert rig.plan(only="middle") == {
        "base": (False, "not selected (--only middle)"),
        "middle": (True, "requested with --only"),
        "last": (False, "not selected (--only middle)"),
    }
    assert rig.plan(from_step="middle") == {
        "base": (False, "before --from middle"),
        "middle": (True, "requested with --from"),
        "last": (True, "follows middle, which runs"),
    }
    assert all(run for run, _ in rig.plan(force=True).values())
    assert rig.plan(skip=("base",))["base"] == (False, "skipped by configuration (provision.skip, --skip)")
    assert rig.plan("provision.skip=[last]")["last"][0] is False
    with pytest.raises(UsageError, match="--only 'nope': no such step; steps are: base, middle, last"):
        rig.plan(only="nope")
    with pytest.raises(UsageError, match="cannot be combined"):
        rig.plan(only="base", from_step="middle")
    with pytest.raises(UsageError, match="--skip 'x'"):
        rig.plan(skip=("x",))
    assert rig.run(only="middle") == {"base": "skipped", "middle": "no changes", "last": "skipped"}
    lines = list(describe_plan(rig.provisioner().plan(Options())))
    assert lines[0].split() == ["10-base.sh", "skip", "done,", "inputs", "unchanged"]


def test_support_files_are_uploaded_and_hashed(rig: Rig) -> None:
    files = rig.scripts / "files" / "extra"
    (files / "sub").mkdir(parents=True)
    (files / "sub" / "unit.conf").write_text("one\n")
    rig.write(
        "15-files.sh",
        sh('cat "$PROVISION_DIR/files/extra/sub/unit.conf"', header=("files=extra",)),
    )
    rig.run()
    assert (rig.guest / "files" / "extra" / "sub" / "unit.conf").read_text() == "one\n"
    (files / "sub" / "unit.conf").write_text("two\n")
    assert rig.plan()["files"] == (True, "inputs changed: file:files/extra/sub/unit.conf")


def test_final_step_runs_only_when_named_and_leaves_no_marker(rig: Rig) -> None:
    # Like 90-seal.sh, it deletes the provision directory, run-step.sh included, while that runs it.
    rig.write("90-seal.sh", sh('echo sealed >> "$WORK/seal.runs"', 'rm -rf -- "$PROVISION_DIR"', header=("final",)))
    assert rig.plan()["seal"][0] is False
    rig.run()
    assert _runs(rig.work, "seal") == 0
    assert rig.run(only="seal")["seal"] == "no changes"
    assert _runs(rig.work, "seal") == 1
    assert not (rig.state / "seal.done").exists()
    assert not rig.guest.exists()


def test_hostile_config_values_reach_scripts_verbatim(rig: Rig) -> None:
    rig.write("40-echo.sh", sh('printf "%s" "$K3S_EXTRA_ARGS" > "$WORK/args"', header=("env=K3S_EXTRA_ARGS",)))
    hostile = "--node-label=a=$(touch /tmp/appliance-pwned)`id`;'\""
    rig.run(f"k3s.extra_args=[{json.dumps(hostile)}]")
    assert "appliance-pwned" in (rig.work / "args").read_text()
    assert not Path("/tmp/appliance-pwned").exists()


def _drop_when(server: SSHServer, condition: Callable[[int], bool], times: int = 1) -> threading.Thread:
    """Drop every connection each time ``condition(drops so far)`` holds, ``times`` times."""

    def watch() -> None:
        dropped = 0
        deadline = time.monotonic() + 60
        while dropped < times and time.monotonic() < deadline:
            if condition(dropped):
                server.drop_connections()
                dropped += 1
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_connection_dropped_mid_step_reconnects_and_reruns_the_step(private_sshd: SSHServer, tmp_path: Path) -> None:
    with private_sshd.session(known_hosts=tmp_path / "kh", retry_delay=(0.1, 0.3)) as session:
        rig = Rig(tmp_path, session)
        rig.write("10-base.sh", BASE)
        rig.write(
            "20-flaky.sh",
            sh(
                'echo attempt >> "$WORK/flaky.runs"',
                'if [[ ! -e "$WORK/flaky.once" ]]; then touch "$WORK/flaky.once"; sleep 60; fi',
                'echo "changed: flaky"',
            ),
        )
        watcher = _drop_when(private_sshd, lambda _: (rig.work / "flaky.once").exists())
        report = rig.provisioner().run(Options())
        watcher.join()
    assert [s.outcome for s in report.steps] == ["changed", "changed"]
    assert report.steps[1].attempts == 2
    assert _runs(rig.work, "flaky") == 2
    assert (rig.state / "flaky.done").exists()


def test_connection_dropping_every_time_fails_clearly(private_sshd: SSHServer, tmp_path: Path) -> None:
    with private_sshd.session(known_hosts=tmp_path / "kh", retry_delay=(0.1, 0.3)) as session:
        rig = Rig(tmp_path, session)
        rig.write("20-hang.sh", sh('echo attempt >> "$WORK/hang.runs"', "sleep 60"))
        # Drop the link each time a new attempt of the step has started.
        watcher = _drop_when(private_sshd, lambda drops: _runs(rig.work, "hang") > drops, times=2)
        with pytest.raises(StepFailed, match="lost its connection 2 times; giving up") as info:
            rig.provisioner("provision.reconnect_attempts=1").run(Options())
        watcher.join()
    assert "A rerun resumes at this step" in str(info.value)
    assert _runs(rig.work, "hang") == 2


def test_reboot_after_waits_for_a_new_boot_id(private_sshd: SSHServer, tmp_path: Path) -> None:
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("first-boot\n")
    # The loopback host cannot reboot: the "reboot" rewrites the boot id file the session reads
    # and drops every connection, which is what the runner observes of a real reboot.
    reboot = f"sleep 0.5; echo second-boot > {boot_id}"
    with private_sshd.session(known_hosts=tmp_path / "kh", retry_delay=(0.1, 0.3),
                              boot_id_path=str(boot_id), reboot_command=reboot) as session:
        rig = Rig(tmp_path, session)
        rig.write("10-kernel.sh", sh('echo "changed: kernel"', header=("reboot-after",)))
        rig.write("20-after.sh", LAST)
        report = rig.provisioner().run(Options())
        assert session.boot_id() == "second-boot"
    assert [s.outcome for s in report.steps] == ["changed", "changed"]


def test_pinned_uploads_are_installed_hashed_and_not_resent(rig: Rig) -> None:
    """Artifacts reach their guest path before a step that declares their need; a changed one reruns that step."""
    artifact = rig.tmp / "cache" / "bundle.tar"
    artifact.parent.mkdir()
    artifact.write_bytes(b"v1" * 50_000)
    dest = rig.tmp / "guest-artifacts" / "sub dir" / "bundle.tar"  # a space: the install command is quoted
    rig.write("15-k3s.sh", sh(f'cat "{dest}" | sha256sum > "$WORK/seen"', 'echo "changed: consumed"',
                              header=("needs=k3s-images",)))

    def run() -> dict[str, str]:
        provisioner = Provisioner(rig.cfg(), rig.session, directory=rig.scripts, state_dir=str(rig.state),
                                  guest_dir=str(rig.guest), uploads=[GuestUpload("k3s-images", artifact, str(dest))])
        outcomes = {s.name: s.outcome for s in provisioner.run(Options()).steps}
        return {name: outcomes[name] for name in ("base", "k3s")}

    assert run() == {"base": "changed", "k3s": "changed"}
    assert dest.read_bytes() == artifact.read_bytes()
    first_seen = (rig.work / "seen").read_text()
    marker = json.loads((rig.state / "k3s.done").read_text())
    assert f"upload:{dest}" in marker["inputs"]
    assert f"upload:{dest}" not in json.loads((rig.state / "base.done").read_text())["inputs"]

    mtime = dest.stat().st_mtime_ns
    assert run() == {"base": "skipped", "k3s": "skipped"}
    assert dest.stat().st_mtime_ns == mtime, "an identical artifact was sent again"

    artifact.write_bytes(b"v2" * 50_000)
    assert run() == {"base": "skipped", "k3s": "changed"}, "a changed artifact reruns the step that reads it"
    assert dest.read_bytes() == artifact.read_bytes()
    assert (rig.work / "seen").read_text() != first_seen
