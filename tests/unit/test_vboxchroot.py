"""The VirtualBox chroot helper's pure parts: mount script quoting, refusals. The vbox tier runs the rest."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from appliance.errors import PrerequisiteMissing
from appliance.providers.virtualbox import chroot as vboxchroot


def test_mount_script_quotes_every_path() -> None:
    hostile = Path("/tmp/it's a $(touch /tmp/pwned) dir")
    script = vboxchroot._mount_script(Path("/var/cache/x y"), Path("/tmp/s t"), [hostile])
    lines = script.splitlines()
    words = [shlex.split(line) for line in lines]  # how sh splits them: one word per path
    assert ["mount", "--rbind", str(hostile), f"/var/cache/x y{hostile}"] in words
    assert ["mount", "--bind", "/tmp/s t", "/var/cache/x y/tmp"] in words
    assert lines[-1] == "exec sleep infinity"  # the namespace lives as long as the holder


def test_ensure_chroot_needs_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(vboxchroot.os, "geteuid", lambda: 1000)
    with pytest.raises(PrerequisiteMissing, match="needs root"):
        vboxchroot.ensure_chroot(tmp_path / "chroot")
    assert not (tmp_path / "chroot").exists()


def test_a_usable_chroot_is_reused_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "chroot"
    (root / "usr/lib/virtualbox").mkdir(parents=True)
    (root / "usr/lib/virtualbox/VBoxManage").write_text("")
    (root / vboxchroot.STAMP).write_text(vboxchroot.recipe_digest() + "\n")
    monkeypatch.setattr(vboxchroot.os, "geteuid", lambda: 1000)  # would refuse to build
    assert vboxchroot.ensure_chroot(root) == root
    (root / vboxchroot.STAMP).write_text("an older recipe\n")
    with pytest.raises(PrerequisiteMissing):
        vboxchroot.ensure_chroot(root)  # a stale recipe means a rebuild (refused here: not root)
