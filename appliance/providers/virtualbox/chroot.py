"""Real VirtualBox without installing it on the host: a cached Debian chroot, entered per session.

VirtualBox cannot boot VMs on a host without its kernel driver, but everything else
(``VBoxManage import/export/showvminfo/modifyvm/clonemedium``, ``VBoxSVC``, the Python API
``vboxapi``) runs in a chroot holding Debian's ``virtualbox`` package. This module

* builds that chroot once per host with mmdebstrap (``ensure_chroot``): into a temporary
  folder next to the cache folder, under a file lock so parallel sessions never race, renamed
  into place only when complete, reused afterwards;
* runs a session in it (``VBoxSession``): one long-lived holder process owns a private mount
  namespace (``unshare -m --propagation private``) in which ``/dev``, ``/proc``, ``/sys``, a
  per-session ``/tmp`` and the host folders the caller names are mounted into the chroot,
  each host folder **at the same absolute path**. Commands enter that namespace with
  ``nsenter`` and ``chroot``. The mounts exist only inside the namespace: the host never sees
  them, and deleting the chroot folder from the host can never reach host files.
  ``VBoxSVC`` (started on demand by the first command) lives in the same namespace and so
  sees the same files. VirtualBox's config home, ``$HOME`` and its IPC socket folder are in
  the session's ``/tmp``, so sessions never share a VirtualBox registry.
* writes a ``VBoxManage`` wrapper script (``write_wrapper``) that the project's own code finds
  on PATH, so ``export_virtualbox`` and friends run the real VirtualBox unchanged.

``stop()`` ends every process in the session's namespace (VBoxSVC, VBoxXPCOMIPCD) by PID,
then the holder. Used by the ``vbox`` test tier (tests/vbox) and by benchmarks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from appliance.errors import ApplianceError, PrerequisiteMissing
from appliance.run import stop_processes

CHROOT_ENV = "APPLIANCE_VBOX_CHROOT"
DEFAULT_CHROOT = Path("/var/cache/csghub-appliance/vbox-chroot")
# The recipe. Check-Valid-Until is off because the archive's Release date can lag the host's
# clock; signatures are still checked.
MMDEBSTRAP_ARGS = (
    "--variant=apt", "--components=main,contrib",
    "--aptopt=Acquire::Check-Valid-Until \"false\"",
    "--include=virtualbox,python3", "sid",
)
STAMP = ".csghub-vbox-chroot"
VBOXMANAGE = "/usr/lib/virtualbox/VBoxManage"  # the binary, not VBox.sh (which warns about the driver)
SESSION_TMP = "/tmp"
_CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class VBoxCommandFailed(ApplianceError):
    """A command run inside the VirtualBox chroot failed."""

    def __init__(self, argv: Iterable[str], result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        cmd = shlex.join(argv)
        super().__init__(f"`{cmd}` in the VirtualBox chroot exited {result.returncode}:\n"
                         f"{result.stderr.strip() or result.stdout.strip()}")


def recipe_digest() -> str:
    return hashlib.sha256("\0".join(MMDEBSTRAP_ARGS).encode()).hexdigest()[:16]


def chroot_path() -> Path:
    """Where the chroot lives: ``$APPLIANCE_VBOX_CHROOT``, else /var/cache/csghub-appliance/vbox-chroot."""
    return Path(os.environ.get(CHROOT_ENV) or DEFAULT_CHROOT)


def _usable(root: Path) -> bool:
    stamp = root / STAMP
    return stamp.is_file() and stamp.read_text().strip() == recipe_digest() and (root / VBOXMANAGE[1:]).is_file()


def ensure_chroot(root: Path | None = None, *, mirror: str | None = None, timeout: float = 1200) -> Path:
    """The VirtualBox chroot at ``root``, built now if missing (~40 s, ~750 MB); raises PrerequisiteMissing."""
    root = (root or chroot_path()).absolute()
    if _usable(root):
        return root
    if os.geteuid() != 0:
        raise PrerequisiteMissing("building the VirtualBox chroot needs root (mmdebstrap, mounts, chroot)")
    for tool in ("mmdebstrap", "unshare", "nsenter", "chroot"):
        if shutil.which(tool) is None:
            raise PrerequisiteMissing(f"{tool} is not installed; the VirtualBox chroot needs it",
                                      hint="apt-get install --no-install-recommends mmdebstrap util-linux")
    root.parent.mkdir(parents=True, exist_ok=True)
    with (root.parent / f"{root.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it right now
        if _usable(root):
            return root
        build = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.build-"))
        try:
            build.chmod(0o755)
            argv = ["mmdebstrap", *MMDEBSTRAP_ARGS, str(build), *([mirror] if mirror else [])]
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                raise PrerequisiteMissing(f"mmdebstrap did not finish within {timeout:.0f} s") from None
            if done.returncode != 0:
                tail = "\n".join(done.stderr.strip().splitlines()[-8:])
                raise PrerequisiteMissing(f"mmdebstrap could not build the VirtualBox chroot "
                                          f"(is Debian's archive reachable?):\n{tail}")
            (build / STAMP).write_text(recipe_digest() + "\n")
            if root.exists():  # an older recipe's chroot: move it aside, then remove it
                old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.old-"))
                root.rename(old / "root")
                shutil.rmtree(old, ignore_errors=True)
            build.rename(root)
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
    return root


def _mount_script(root: Path, session_tmp: Path, binds: Iterable[Path]) -> str:
    r = shlex.quote(str(root))
    lines = [
        "set -eu",
        f"mount --rbind /dev {r}/dev",
        f"mount -t proc proc {r}/proc",
        f"mount --rbind /sys {r}/sys",
        f"mount --bind {shlex.quote(str(session_tmp))} {r}/tmp",
    ]
    for path in binds:
        target = shlex.quote(f"{root}{path}")
        # Mount points under /tmp land in the session's own /tmp; others are empty folders in the chroot.
        lines += [f"mkdir -p {target}", f"mount --rbind {shlex.quote(str(path))} {target}"]
    lines += ["echo ready", "exec sleep infinity"]
    return "\n".join(lines)


class VBoxSession:
    """VirtualBox commands in the chroot, with ``binds`` visible at their own paths. A context manager."""

    def __init__(self, root: Path, workdir: Path, binds: Iterable[Path] = ()) -> None:
        self.root = root
        self.workdir = workdir
        self.binds = sorted({Path(b).resolve() for b in binds})
        self.session_tmp = workdir / "chroot-tmp"
        self.holder: subprocess.Popen[str] | None = None
        # Inside the chroot; all under the session's own /tmp.
        self.home = f"{SESSION_TMP}/home"
        self.user_home = f"{SESSION_TMP}/vbox-user-home"
        self.machine_folder = f"{SESSION_TMP}/vms"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> VBoxSession:
        self.session_tmp.mkdir(parents=True, exist_ok=True)
        self.session_tmp.chmod(0o1777)
        for sub in ("home", "vbox-user-home", "vms"):
            (self.session_tmp / sub).mkdir(exist_ok=True)
        for path in self.binds:
            if not path.is_dir():
                raise PrerequisiteMissing(f"cannot show {path} inside the VirtualBox chroot: not a folder")
        script = _mount_script(self.root, self.session_tmp, self.binds)
        self.holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            err = self.holder.stderr.read() if self.holder.stderr else ""
            self.holder.kill()
            self.holder.wait()
            raise PrerequisiteMissing(f"could not set up the VirtualBox chroot's mounts: {err.strip()}")
        # For root, VirtualBox takes the default machine folder from the password database, not
        # $HOME: point it into the session's /tmp so imported VMs never land in the shared chroot.
        self.manage("setproperty", "machinefolder", self.machine_folder)
        return self

    def _namespace(self) -> str:
        assert self.holder is not None, "session not started"
        return os.readlink(f"/proc/{self.holder.pid}/ns/mnt")

    def processes(self) -> list[int]:
        """PIDs in this session's mount namespace other than the holder (VBoxSVC, VBoxXPCOMIPCD, ...)."""
        if self.holder is None:
            return []
        ns = self._namespace()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.holder.pid:
                continue
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    pids.append(int(entry))
        return pids

    def stop(self) -> None:
        if self.holder is None:
            return
        stop_processes(self.processes(), 10)
        self.holder.kill()
        self.holder.wait()
        self.holder = None

    def __enter__(self) -> VBoxSession:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- commands ------------------------------------------------------------------------

    def argv(self, *command: str) -> list[str]:
        """Host argv that runs ``command`` in the chroot, in the caller's folder when it is visible there."""
        assert self.holder is not None, "session not started"
        inner = 'cd "$1" 2>/dev/null || cd /; shift; exec "$@"'
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", "chroot", str(self.root),
                "/usr/bin/env", "-i", f"PATH={_CHROOT_PATH}", f"HOME={self.home}",
                f"VBOX_USER_HOME={self.user_home}", "LANG=C.UTF-8", "LC_ALL=C.UTF-8",
                "/bin/sh", "-c", inner, "sh", os.getcwd(), *command]

    def run(self, *command: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*command), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise VBoxCommandFailed(command, result)
        return result

    def manage(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``VBoxManage args...`` in the chroot."""
        return self.run(VBOXMANAGE, *args, check=check, timeout=timeout)

    def python(self, code: str, *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """The chroot's python3 running ``code`` (``vboxapi`` importable)."""
        return self.run("python3", "-c", code, check=check, timeout=timeout)

    def write_wrapper(self, bin_dir: Path) -> Path:
        """A ``VBoxManage`` script in ``bin_dir`` that runs the chroot's VBoxManage; put ``bin_dir`` on PATH."""
        bin_dir.mkdir(parents=True, exist_ok=True)
        wrapper = bin_dir / "VBoxManage"
        fixed = self.argv(VBOXMANAGE)
        # argv() ends with: sh <cwd> VBoxManage; the wrapper supplies its own cwd and arguments.
        head, tail = fixed[:-2], fixed[-1:]
        wrapper.write_text("#!/bin/sh\n# VirtualBox's VBoxManage in the chroot (appliance/vboxchroot.py).\n"
                           f'exec {shlex.join(head)} "$PWD" {shlex.join(tail)} "$@"\n')
        wrapper.chmod(0o755)
        return wrapper
