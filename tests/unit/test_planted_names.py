"""No writer on the build host follows a symlink planted under its temporary name (issue 12, item 8).

`invoke render --output` used to write through the fixed name `<output>.tmp` (test_render.py
covers it); `invoke values --output`, the manifests, the image list, the build's known_hosts
and the OVA writer's `.partial` files had the same pattern. Each case plants a symlink under
every fixed temporary name the old code used, runs the real writer and checks the symlink's
target is untouched, the output is complete and no temporary file is left.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import paramiko

from appliance.config import PROJECT_ROOT, ApplianceConfig

PRECIOUS = "precious\n"


def _plant(folder: Path, *names: str) -> Path:
    victim = folder.parent / f"{folder.name}-victim"
    victim.write_text(PRECIOUS)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(victim)
    return victim


def test_values_output_does_not_follow_a_planted_temporary_name(tmp_path: Path) -> None:
    out = tmp_path / "shared" / "values.yaml"
    victim = _plant(out.parent, ".values.yaml.tmp")
    proc = subprocess.run([sys.executable, "-m", "invoke", "-r", str(PROJECT_ROOT), "values", "--output", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == PRECIOUS
    assert not out.is_symlink() and "global:" in out.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == [".values.yaml.tmp", "values.yaml"]


def test_manifests_and_image_list_do_not_follow_planted_names(
        tmp_path: Path, make_cfg: Callable[..., ApplianceConfig]) -> None:
    from appliance.images import ImageEntry, write_image_list
    from appliance.manifests import write_manifests

    folder = tmp_path / "manifests"
    victim = _plant(folder, ".csghub.yaml.tmp", ".coredns-custom.yaml.tmp", ".csghub-redis-policy.yaml.tmp",
                    ".images.txt.tmp")
    written = write_manifests(make_cfg(), folder)
    listed = write_image_list([ImageEntry("docker.io/library/busybox:1.36", ("busybox:1.36",))], folder)
    assert victim.read_text() == PRECIOUS
    assert {p.name for p, _ in written} == {"csghub.yaml", "coredns-custom.yaml", "csghub-redis-policy.yaml"}
    assert "busybox" in listed.read_text()
    for path in (*(p for p, _ in written), listed):
        assert not path.is_symlink() and path.stat().st_size > 0
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


def test_known_hosts_is_not_written_through_a_planted_name(tmp_path: Path) -> None:
    from appliance.ssh import _save_host_keys

    path = tmp_path / "build" / "known_hosts"
    victim = _plant(path.parent, "known_hosts.tmp")
    keys = paramiko.HostKeys()
    key = paramiko.Ed25519Key.from_private_key_file(str(_ed25519(tmp_path)))
    keys.add("[127.0.0.1]:2222", key.get_name(), key)
    _save_host_keys(keys, path)
    assert victim.read_text() == PRECIOUS
    assert paramiko.HostKeys(str(path)).lookup("[127.0.0.1]:2222") is not None
    assert sorted(p.name for p in path.parent.iterdir()) == ["known_hosts", "known_hosts.tmp"]


def _ed25519(folder: Path) -> Path:
    key = folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def test_the_ova_writer_does_not_follow_planted_partial_names(
        tmp_path: Path, small_disk: Path, make_cfg: Callable[..., ApplianceConfig]) -> None:
    from appliance.export.ova import write_ova

    staging = tmp_path / "staging"
    victim = _plant(staging, ".csghub-test.ova.partial", ".csghub-test.ova.sha256.partial")
    for writer in ("parallel", "qemu-img"):
        result = write_ova(small_disk, make_cfg(f"output.vmdk_writer={writer}"), staging / "csghub-test.ova")
        assert victim.read_text() == PRECIOUS, writer
        assert not result.path.is_symlink() and result.path.stat().st_size > 0
        assert result.sha256_file.read_text().split()[0] == result.sha256
        assert sorted(p.name for p in staging.iterdir()) == ["csghub-test.ova", "csghub-test.ova.sha256"]
        _plant(staging, ".csghub-test.ova.partial", ".csghub-test.ova.sha256.partial")


def test_the_version_lock_and_the_helm_binary_are_not_written_through_planted_names(tmp_path: Path) -> None:
    import io
    import tarfile

    from appliance.artifacts import _unpack_helm, write_lock

    folder = tmp_path / "cache"
    victim = _plant(folder, "versions.lock.yaml.tmp", "helm.tmp")
    lock = folder / "versions.lock.yaml"
    write_lock({"k3s": {"version": "v1"}}, path=lock)
    tarball = tmp_path / "helm.tar.gz"
    program = b"#!/bin/sh\necho helm\n"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("linux-amd64/helm")
        info.size = len(program)
        tar.addfile(info, io.BytesIO(program))
    _unpack_helm(tarball, folder / "helm")
    assert victim.read_text() == PRECIOUS
    assert "k3s" in lock.read_text() and not lock.is_symlink()
    helm = folder / "helm"
    assert helm.read_bytes() == program and helm.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in folder.iterdir()) == ["helm", "helm.tmp", "versions.lock.yaml",
                                                        "versions.lock.yaml.tmp"]
