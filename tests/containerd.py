"""A real containerd for tests: started as root on a private socket, root and state directory under a
temporary directory (its own config: no CRI plugin, nothing listening but that socket), stopped by PID.

Images are made locally as Docker-format archives (``manifest.json`` with ``RepoTags`` + a config + one
layer, written by hand), imported with ``ctr images import --no-unpack`` into the ``k8s.io`` namespace and
listed with ``ctr images ls -q``: ctr names Docker archives' RepoTags the way the CRI names pulled images
(``docker.ParseDockerRef``), so the store shows what k3s's containerd shows. (OCI archives keep names as
written and would prove nothing.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from appliance.run import stop_processes


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def docker_archive(path: Path, repo_tags: list[str], payload: bytes = b"csghub-appliance test image\n") -> Path:
    """A minimal Docker-format image archive (``docker save`` layout) carrying ``repo_tags``."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer_tar:
        _add(layer_tar, "hello.txt", payload)
    layer = layer_buf.getvalue()
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": repo_tags, "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        _add(tar, "manifest.json", manifest)
        _add(tar, config_name, config)
        _add(tar, "layer.tar", layer)
    return path


class Containerd:
    """One private containerd daemon."""

    def __init__(self, base: Path, bin_dir: Path | None = None) -> None:
        self.base = base
        self.bin_dir = bin_dir  # where containerd and ctr are (default: PATH)
        self.socket = base / "containerd.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        config = self.base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.base / "root"}"\n'
            f'state = "{self.base / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
        )
        with open(self.base / "containerd.log", "wb") as log:  # the daemon keeps its own copy of the fd
            self.process = subprocess.Popen([self._tool("containerd"), "--config", str(config)], stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited: {(self.base / 'containerd.log').read_text()[-2000:]}")
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("containerd did not answer on its socket within 30 s")

    def _tool(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir else name

    def version(self) -> str:
        return subprocess.run([self._tool("containerd"), "--version"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.split()[2]

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self._tool("ctr"), "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=120, check=check)

    def import_archive(self, archive: Path) -> None:
        self.ctr("images", "import", "--no-unpack", str(archive))

    def names(self) -> list[str]:
        return [line for line in self.ctr("images", "ls", "-q").stdout.splitlines() if line]

    def stop(self) -> None:
        if self.process is None:
            return
        stop_processes([self.process.pid], grace=20)  # by PID: TERM, then KILL
        self.process.wait(timeout=10)
        self.process = None


def containerd_missing() -> str | None:
    """Why a real containerd cannot run here, or None."""
    if os.geteuid() != 0:
        return "containerd needs root"
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian package containerd; scripts/setup.sh installs it)"
    return None
