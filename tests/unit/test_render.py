"""Vagrantfile rendering: golden files for both providers, determinism, escaping, `vagrant validate`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT, ApplianceConfig, load_config
from appliance.errors import UsageError
from appliance.render import render_text, render_vagrantfile, vagrant_shell_env_literal

DATA = Path(__file__).resolve().parent.parent / "data"
GOLDEN = DATA / "golden"
FIXTURE_STEPS = DATA / "provision"
HOSTILE = "x'; system('touch /tmp/pwned-ruby') #{`touch /tmp/pwned-ruby2`} $(touch /tmp/pwned-sh) `id` \\ \" \n end"


def _cfg(provider: str, *sets: str) -> ApplianceConfig:
    return load_config(None, [f"provider={provider}", *sets], cwd=Path("/"))


GOLDEN_CASES = {
    "libvirt-default": ("libvirt", [], "qemu"),
    "libvirt-kvm-hostonly": ("libvirt", ["network.hostonly.enabled=true", "vm.box_version=>= 1.0"], "kvm"),
    "virtualbox-default": ("virtualbox", [], None),
    # What macOS/Windows users set: a public box pinned by name, version and checksum (values for the test).
    "virtualbox-public-box": ("virtualbox", ["vm.box=debian/bookworm64", "vm.box_version=12.20250126.1",
                                             "vm.box_checksum=sha256:" + "0123456789abcdef" * 4], None),
    "virtualbox-bridged-skip": (
        "virtualbox",
        ["network.bridged.enabled=true", "network.bridged.interface=en0", "network.bridged.address=10.1.2.3",
         "provision.skip={k3s}", "virtualbox.nat_localhost_reachable=false"],
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_render_matches_golden(name: str) -> None:
    provider, sets, driver = GOLDEN_CASES[name]
    text = render_text(_cfg(provider, *sets), output_dir=PROJECT_ROOT, libvirt_driver=driver,
                       provision_dir=FIXTURE_STEPS)
    golden = GOLDEN / f"{name}.Vagrantfile"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"render differs from {golden}; rerun with UPDATE_GOLDEN=1 if intended"


def test_render_is_byte_identical_and_atomic(tmp_path: Path) -> None:
    cfg = _cfg("libvirt")
    a = render_vagrantfile(cfg, tmp_path / "a" / "Vagrantfile", libvirt_driver="qemu").read_bytes()
    b = render_vagrantfile(cfg, tmp_path / "a" / "Vagrantfile", libvirt_driver="qemu").read_bytes()
    assert a == b
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["Vagrantfile"]


def test_render_refuses_unresolved_provider() -> None:
    with pytest.raises(UsageError, match="resolve 'auto' first"):
        render_text(_cfg("auto"), output_dir=PROJECT_ROOT)


def test_render_refuses_an_unresolved_libvirt_driver() -> None:
    # `auto` must be probed (appliance.providers.libvirt.hostprobe via appliance.vagrant.render), never guessed as kvm.
    with pytest.raises(UsageError, match="cannot render libvirt driver 'auto'"):
        render_text(_cfg("libvirt"), output_dir=PROJECT_ROOT)
    assert "lv.driver = 'kvm'" in render_text(_cfg("libvirt", "libvirt.driver=kvm"), output_dir=PROJECT_ROOT)


def test_skipped_steps_are_not_provisioners() -> None:
    text = render_text(_cfg("libvirt", "provision.skip={k3s}"), output_dir=PROJECT_ROOT,
                       provision_dir=FIXTURE_STEPS, libvirt_driver="qemu")
    assert "config.vm.provision 'base'" in text
    assert "config.vm.provision 'k3s'" not in text
    assert "config.vm.provision 'kernel-reboot', type: 'shell', reboot: true" in text
    # The final step seals the VM (removes the login key, powers off): never part of `vagrant up`.
    assert "config.vm.provision 'seal'" not in text and "90-seal.sh" not in text


needs_ruby = pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed (comes with vagrant)")

# Loads a Vagrantfile with a stand-in Vagrant.configure that records what it was given, then
# prints every provisioner env value and the box name as JSON: proof of what Ruby evaluated.
RUBY_PROBE = r"""
require 'json'
class Rec
  def initialize; @calls = []; end
  attr_reader :calls
  def method_missing(name, *args, **kw, &blk)
    @calls << [name.to_s, args.map(&:to_s), kw.transform_values { |v| v.is_a?(Hash) ? v : v.to_s }]
    blk.call(self) if blk
    self
  end
  def respond_to_missing?(*) = true
end
module Vagrant
  def self.configure(_v); $rec = Rec.new; yield $rec; end
  def self.require_version(*); end
end
load ARGV[0]
envs = $rec.calls.select { |c| c[2].key?(:env) }.map { |c| c[2][:env] }
puts JSON.generate({'envs' => envs, 'calls' => $rec.calls.map { |c| [c[0], c[1]] }})
"""


@needs_ruby
def test_injection_through_config_is_inert(tmp_path: Path) -> None:
    for marker in ("/tmp/pwned-ruby", "/tmp/pwned-ruby2", "/tmp/pwned-sh"):
        Path(marker).unlink(missing_ok=True)
    cfg = _cfg("libvirt", "libvirt.driver=qemu")
    cfg = cfg.model_copy(update={"k3s": cfg.k3s.model_copy(update={"extra_args": [HOSTILE]}),
                                 "output": cfg.output.model_copy(update={"description": HOSTILE})})
    vf = tmp_path / "Vagrantfile"
    vf.write_text(render_text(cfg, output_dir=tmp_path, provision_dir=FIXTURE_STEPS))
    probe = tmp_path / "probe.rb"
    probe.write_text(RUBY_PROBE)
    out = subprocess.run(["ruby", str(probe), str(vf)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json
    import shlex

    envs = json.loads(out.stdout)["envs"]
    assert envs, "no provisioner env found"
    assert not Path("/tmp/pwned-ruby").exists() and not Path("/tmp/pwned-ruby2").exists()
    # What Vagrant does next (quote_and_escape in its shell provisioner): wrap in double quotes,
    # turning each " into "\"". Run exactly that through bash and read the value back.
    [value] = [env["K3S_EXTRA_ARGS"] for env in envs if "K3S_EXTRA_ARGS" in env]
    quoted = '"' + value.replace('"', '"\\""') + '"'
    sh = subprocess.run(["bash", "-c", f'K3S_EXTRA_ARGS={quoted}; printf %s "$K3S_EXTRA_ARGS"'],
                        capture_output=True, text=True, timeout=30)
    assert not Path("/tmp/pwned-sh").exists(), "shell code in a config value ran"
    assert sh.stdout == shlex.join([HOSTILE])


def test_shell_env_literal_escapes_dollar_backquote_backslash() -> None:
    assert vagrant_shell_env_literal("a$b`c\\d'e") == "'a\\\\$b\\\\`c\\\\\\\\d\\'e'"


needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant not installed")


@needs_vagrant
@pytest.mark.parametrize("provider", ["libvirt", "virtualbox"])
def test_vagrant_validate_accepts_render(provider: str, tmp_path: Path) -> None:
    cfg = _cfg(provider, "network.hostonly.enabled=true")
    render_vagrantfile(cfg, tmp_path / "Vagrantfile", libvirt_driver="qemu")
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant.d"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    if provider == "virtualbox":
        # VirtualBox cannot run here. Vagrant's provider only asks VBoxManage for its version
        # before validating the config: a two-line stand-in at that boundary.
        fake = tmp_path / "fakebin"
        fake.mkdir()
        (fake / "VBoxManage").write_text("#!/bin/sh\necho 7.0.20r163906\n")
        (fake / "VBoxManage").chmod(0o755)
        env["PATH"] = f"{fake}:{env['PATH']}"
    proc = subprocess.run(["vagrant", "validate"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout


def test_box_checksum_must_name_its_algorithm() -> None:
    from appliance.errors import ConfigError

    for bad in ("0123abcd", "md5:" + "0" * 32, "sha256:" + "0" * 63, "sha256:" + "G" * 64):
        with pytest.raises(ConfigError, match=r"vm\.box_checksum"):
            _cfg("virtualbox", f"vm.box_checksum={bad}")


@needs_vagrant
def test_vagrant_validate_accepts_pinned_public_box(tmp_path: Path) -> None:
    cfg = _cfg("virtualbox", "vm.box=debian/bookworm64", "vm.box_version=12.20250126.1",
               "vm.box_checksum=sha256:" + "ab" * 32)
    render_vagrantfile(cfg, tmp_path / "Vagrantfile")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "VBoxManage").write_text("#!/bin/sh\necho 7.0.20r163906\n")  # as in the test above
    (fake / "VBoxManage").chmod(0o755)
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant.d"), "VAGRANT_CHECKPOINT_DISABLE": "1",
           "PATH": f"{fake}:{os.environ['PATH']}"}
    proc = subprocess.run(["vagrant", "validate"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Vagrant refuses settings it does not know, so the names above are ones it really reads.
    vf = tmp_path / "Vagrantfile"
    vf.write_text(vf.read_text().replace("box_download_checksum =", "box_download_checksumm ="))
    proc = subprocess.run(["vagrant", "validate"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0


@needs_vagrant
def test_vagrant_validate_rejects_broken_render(tmp_path: Path) -> None:
    """The validation test above could fail: a setting libvirt does not know is refused."""
    render_vagrantfile(_cfg("libvirt"), tmp_path / "Vagrantfile", libvirt_driver="qemu")
    vf = tmp_path / "Vagrantfile"
    vf.write_text(vf.read_text().replace("lv.video_type = 'none'", "lv.no_such_setting = 1"))
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant.d"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    proc = subprocess.run(["vagrant", "validate"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0


def test_uploads_are_staged_then_installed_with_quoting() -> None:
    from appliance.render import Upload

    ups = [Upload("00-k3s", "/cache/k3s", "/var/cache/csghub-appliance/artifacts/k3s", "a" * 64, "k3s-binary"),
           Upload("01-odd", "/cache/odd", "/var/cache/a b;$(id)", "b" * 64, "chart")]
    text = render_text(_cfg("libvirt"), output_dir=PROJECT_ROOT, provision_dir=FIXTURE_STEPS, uploads=ups,
                       libvirt_driver="qemu")
    assert "destination: '/var/tmp/csghub-provision/uploads/00-k3s'" in text
    line = next(ln for ln in text.splitlines() if "'uploads-install'" in ln)
    staged = "/var/tmp/csghub-provision/uploads/00-k3s"
    assert f"install -D -m 0644 {staged} /var/cache/csghub-appliance/artifacts/k3s" in line
    assert "\\'/var/cache/a b;$(id)\\'" in line  # shell-quoted, inside a Ruby literal
    assert text.index("'uploads-install'") < text.index("config.vm.provision 'base'")


def test_render_output_does_not_follow_a_planted_temporary_name(tmp_path: Path) -> None:
    # The old writer wrote through the fixed name <output>.tmp: a symlink there redirected it.
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "Vagrantfile"
    (tmp_path / "Vagrantfile.tmp").symlink_to(victim)
    render_vagrantfile(_cfg("libvirt"), out, libvirt_driver="qemu")
    assert victim.read_text() == "precious\n"
    assert "Vagrant.configure" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Vagrantfile", "Vagrantfile.tmp", "victim"]
