"""Fixtures for the ``vbox`` tier: the real VirtualBox 7.2 (Debian sid/contrib) in a cached chroot.

``vbox`` (session) -> ``appliance.providers.virtualbox.chroot.VBoxSession``
    ``vbox.manage(*args, check=True, timeout=600)`` runs ``VBoxManage args...`` in the chroot and
    returns the ``subprocess.CompletedProcess[str]`` (``VBoxCommandFailed`` on a non-zero exit
    when ``check``); ``vbox.python(code)`` runs the chroot's python3, where ``vboxapi`` imports.
    The session's pytest base temp folder and the project tree are visible inside the chroot at
    their own absolute paths, so ``tmp_path`` files can be handed to VirtualBox as they are.
    The chroot (~750 MB) is built on first use into /var/cache/csghub-appliance/vbox-chroot
    (``$APPLIANCE_VBOX_CHROOT`` overrides; ~40 s) and reused. VirtualBox's config home, machine
    folder and IPC socket are private to the session; its VBoxSVC is stopped by PID at the end.
    The tier is skipped, with the reason, where the chroot cannot be made (not root, no
    mmdebstrap, Debian's archive unreachable); with CI=true it fails instead.

``vboxmanage_on_path`` (function) -> Path of a ``VBoxManage`` wrapper put first on PATH, so the
    project's own code (``export_virtualbox``, verify) runs the real VirtualBox unchanged.

``assert_disk_reads_back(vbox, info, source, work)``: the imported VM's first SATA disk, cloned to raw, is
``source`` byte for byte (``qemu-img compare``).

``vm_name`` (function) -> a VM name unique to the test; ``make_cfg``, ``small_disk``,
``built_ova``: like tests/unit's (a 64 MiB disk with data in three places, its OVF 1.0 OVA).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT
from appliance.errors import PrerequisiteMissing
from appliance.providers.virtualbox.chroot import VBoxSession, ensure_chroot
from appliance.run import run

SHARED = (PROJECT_ROOT / ".." / "shared").resolve()


@pytest.fixture(scope="session")
def vbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VBoxSession]:
    try:
        root = ensure_chroot()
    except PrerequisiteMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the vbox tier must run in CI, but the VirtualBox chroot is not available: {exc}")
        pytest.skip(f"VirtualBox chroot not available: {exc}")
    binds = [tmp_path_factory.getbasetemp(), PROJECT_ROOT]
    if SHARED.is_dir():
        binds.append(SHARED)
    # The session's own /tmp for the chroot sits outside the base temp folder (which is bound into it).
    workdir = Path(tempfile.mkdtemp(prefix="csghub-vbox-session-"))
    session = VBoxSession(root, workdir, binds)
    try:
        session.start()
        yield session
    finally:
        session.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def vboxmanage_on_path(vbox: VBoxSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wrapper = vbox.write_wrapper(tmp_path / "vbox-bin")
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    return wrapper


@pytest.fixture
def vm_name(request: pytest.FixtureRequest) -> str:
    return f"vboxtest-{request.node.name[:40]}-{uuid.uuid4().hex[:6]}".replace("[", "-").replace("]", "")


@pytest.fixture
def import_ova(vbox: VBoxSession) -> Iterator[Callable[..., dict[str, str]]]:
    """``import_ova(ova, name, *extra_args)`` -> the imported VM's ``showvminfo --machinereadable``, parsed.

    Every VM imported through it is unregistered and deleted when the test ends.
    """
    from appliance.providers.virtualbox.export import parse_machinereadable

    imported: list[str] = []

    def do_import(ova: Path, name: str, *extra: str) -> dict[str, str]:
        done = vbox.manage("import", str(ova), "--vsys", "0", "--vmname", name, *extra)
        # VBoxManage exits 0 even when it refuses (e.g. an EULA not accepted): read its verdict.
        assert "Successfully imported the appliance." in done.stdout, done.stdout + done.stderr
        imported.append(name)
        return parse_machinereadable(vbox.manage("showvminfo", name, "--machinereadable").stdout)

    yield do_import
    for name in imported:
        vbox.manage("unregistervm", name, "--delete", check=False)


def assert_disk_reads_back(vbox: VBoxSession, info: dict[str, str], source: Path, work: Path) -> None:
    """The imported VM's first SATA disk holds ``source`` (qcow2) byte for byte: cloned to raw by VirtualBox,
    compared by ``qemu-img compare`` (exit 1, a failed run, on any differing byte)."""
    raw = work / "readback.raw"
    vbox.manage("clonemedium", "disk", info["SATA-ImageUUID-0-0"], str(raw), "--format", "RAW")
    try:
        run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(source), str(raw)])
    finally:
        vbox.manage("closemedium", "disk", str(raw), check=False)
