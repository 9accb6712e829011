"""The VM lifecycle (appliance.vm) asks each question once, renders only when told, and needs no
Vagrantfile (so no artifacts) to report or remove a VM.

Vagrant is stood in for by a script on PATH that records its command lines and answers
``status``, ``box list`` and ``up`` the way Vagrant 2.3/2.4 does with ``--machine-readable``
(``timestamp,target,type,data`` lines: Vagrant's lib/vagrant/ui.rb ``MachineReadable#machine``);
the provider is the recording FakeProvider. The real ``invoke status`` / ``invoke destroy`` run
at the end, with an empty cache and a libvirt that cannot answer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance import vm
from appliance.config import ApplianceConfig, load_config
from appliance.errors import VagrantError
from appliance.state import BuildState
from tests.fake_provider import FakeProvider

ROOT = Path(__file__).resolve().parents[2]

FAKE_VAGRANT = '''#!/usr/bin/env python3
import sys
from pathlib import Path

args = sys.argv[1:]
with open(Path(__file__).with_suffix(".log"), "a") as log:
    log.write(" ".join(args) + "\\n")
state = Path(__file__).with_suffix(".state")
if args[:1] == ["status"]:
    now = state.read_text() if state.exists() else "not_created"
    print(f"1733450000,default,metadata,provider,fake")
    print(f"1733450000,default,provider-name,fake")
    print(f"1733450000,default,state,{now}")
elif args[:2] == ["box", "list"]:
    print("1733450000,,box-name,csghub/debian12")
    print("1733450000,,box-provider,fake")
    print("1733450000,,box-version,12.1.2")
elif args[:1] == ["up"]:
    print("==> default: Machine booted and ready!")
    state.write_text("running")
elif args[:1] == ["destroy"]:
    state.write_text("not_created")
else:
    sys.exit(f"fake vagrant: {args} is not stood in for")
'''


@pytest.fixture
def vagrant_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "vagrant"
    script.write_text(FAKE_VAGRANT)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    return script.with_suffix(".log")


def _cfg(tmp_path: Path) -> ApplianceConfig:
    return load_config(None, [f"output.build_dir={tmp_path / 'build'}", "provision.skip=[k3s, csghub]",
                              "libvirt.driver=qemu"], "libvirt", cwd=tmp_path)


def _commands(log: Path) -> list[str]:
    return [line.split()[0] if not line.startswith("box") else "box list"
            for line in log.read_text().splitlines()] if log.exists() else []


def test_up_of_a_new_vm_asks_each_question_once(tmp_path: Path, vagrant_log: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)
    fake = FakeProvider(cfg)
    sealed_reads: list[Path] = []
    real_refuse = vm.refuse_if_sealed
    monkeypatch.setattr(vm, "refuse_if_sealed", lambda c, action: (sealed_reads.append(c.build_dir),
                                                                   real_refuse(c, action))[1])
    vm.vagrantfile(cfg).parent.mkdir(parents=True)
    vm.vagrantfile(cfg).write_text("# rendered earlier\n")
    state = vm.up(cfg, fake)
    assert state.running
    assert len(sealed_reads) == 1, "sealed? asked once"
    asked = [name for name, _ in fake.calls]
    assert asked.count("preflight") == 1 and "check_reachable" not in asked, "reachable? asked once (preflight)"
    assert asked == ["preflight", "before_create"]
    commands = _commands(vagrant_log)
    assert commands.count("status") == 1, f"status? asked once: {commands}"
    assert commands == ["status", "box list", "up"]


def test_up_never_renders_on_its_own(tmp_path: Path, vagrant_log: Path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(VagrantError, match="no Vagrantfile") as info:
        vm.up(cfg, FakeProvider(cfg))
    assert "invoke up" in str(getattr(info.value, "hint", ""))
    assert not vm.vagrantfile(cfg).exists() and _commands(vagrant_log) == []


def test_status_and_destroy_without_a_vagrantfile_ask_the_hypervisor(tmp_path: Path, vagrant_log: Path) -> None:
    cfg = _cfg(tmp_path)
    fake = FakeProvider(cfg)
    assert vm.status(cfg, fake).state == "not_created"
    assert fake.calls == [], "nothing rendered, nothing recorded: nobody is asked"
    record = vm.project_dir(cfg) / ".vagrant" / "machines" / "default" / "fake"
    record.mkdir(parents=True)
    (record / "id").write_text("3f0c9b0e-1111-4a4a-9b9b-000000000001\n")
    fake.machines["3f0c9b0e-1111-4a4a-9b9b-000000000001"] = "shutoff"
    assert vm.status(cfg, fake).state == "shutoff"
    vm.destroy(cfg, fake)
    assert ("remove_machine", "3f0c9b0e-1111-4a4a-9b9b-000000000001") in fake.calls
    assert not fake.machines and not record.exists(), "the VM and Vagrant's record of it are gone"
    assert vm.status(cfg, fake).state == "not_created"
    assert _commands(vagrant_log) == [], "no Vagrant command runs without a Vagrantfile"
    assert not vm.vagrantfile(cfg).exists(), "nothing was rendered"


@pytest.mark.parametrize("task", ["status", "destroy"])
def test_invoke_status_and_destroy_need_no_artifacts(tmp_path: Path, task: str) -> None:
    build = tmp_path / "build"
    BuildState().save(build)  # a build started once, never fetched
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", task, "--provider", "libvirt", "--set", f"output.build_dir={build}",
         # a libvirt that cannot answer: with no VM recorded, nobody needs to ask it
         "--set", f"libvirt.uri=qemu+unix:///system?socket={tmp_path}/no-libvirt-sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "invoke fetch" not in proc.stderr + proc.stdout
    if task == "status":
        assert proc.stdout.strip().split("\t") == ["default", "not_created", "libvirt"]
    else:
        assert "nothing to destroy" in proc.stdout + proc.stderr
        assert not BuildState.path_for(build).exists(), "the build state went with the (absent) VM"
    assert not (build / "vm" / "Vagrantfile").exists()


@pytest.mark.skipif(__import__("shutil").which("virsh") is None, reason="virsh (libvirt-clients) is not installed")
def test_a_libvirt_that_does_not_answer_never_counts_as_no_vm(tmp_path: Path) -> None:
    """Only libvirt's "no such domain" means not created (real virsh: its test driver, then a socket nobody
    serves); any other failure stops the destroy before Vagrant's record of the VM is forgotten."""
    from appliance.providers.libvirt.provider import LibvirtProvider, domain_missing

    def at(uri: str) -> LibvirtProvider:  # the config takes qemu URIs only: swapped in behind validation
        cfg = _cfg(tmp_path)
        return LibvirtProvider(cfg.model_copy(update={"libvirt": cfg.libvirt.model_copy(update={"uri": uri})}))

    assert at("test:///default").machine_state("test") == "running"  # the test driver's one domain
    assert at("test:///default").machine_state("3f0c9b0e-1111-4a4a-9b9b-000000000001") == "not_created"
    assert domain_missing("error: failed to get domain 'x'\nerror: Domain not found: no domain with matching uuid\n")
    assert not domain_missing("error: failed to get domain 'x'\nerror: internal error: client socket is closed\n")

    down = at(f"qemu+unix:///system?socket={tmp_path}/no-libvirt-sock")
    with pytest.raises(VagrantError, match=r"libvirt did not say whether the domain .* exists .*failed to connect"):
        down.machine_state("3f0c9b0e-1111-4a4a-9b9b-000000000001")
    record = vm.project_dir(down.cfg) / ".vagrant" / "machines" / "default" / "libvirt"
    record.mkdir(parents=True)
    (record / "id").write_text("3f0c9b0e-1111-4a4a-9b9b-000000000001\n")
    with pytest.raises(VagrantError, match="nothing was changed"):
        vm._destroy(down.cfg, down)
    assert (record / "id").is_file(), "Vagrant's record of a VM that may still exist is kept"
