"""A real container registry for tests, and tiny images made locally to fill it.

:class:`Registry` runs Debian's ``docker-registry`` (distribution 2.8) on loopback: its own config,
port, storage directory and TLS certificate from a test CA made here (``openssl``), optionally
with basic auth (an htpasswd file with a bcrypt hash, the only kind distribution accepts); stopped
by PID. skopeo trusts the CA through ``--src-cert-dir``/``--dest-cert-dir`` (``ca_dir``).

:func:`oci_layout_image` writes an image as an OCI layout by hand (layers are gzip tars of one file
each), so tests choose exactly which layers images share; :meth:`Registry.push` puts it into the
registry with skopeo, as an OCI manifest or converted to Docker v2 schema 2.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from appliance.run import stop_processes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def registry_missing() -> str | None:
    for tool in ("docker-registry", "skopeo", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} not found (scripts/setup.sh installs it)"
    return None


def _free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _layer(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


@dataclass(frozen=True)
class Blob:
    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **extra}


def image_blobs(layers: list[dict[str, bytes]], arch: str = "amd64") -> tuple[Blob, list[Blob]]:
    """(manifest, all blobs) of an OCI image made of ``layers`` (each a {path: bytes} mapping)."""
    layer_blobs = []
    diff_ids = []
    for files in layers:
        tar = _layer(files)
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        layer_blobs.append(Blob(gzip.compress(tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"))
    config = Blob(json.dumps({"architecture": arch, "os": "linux", "config": {},
                              "rootfs": {"type": "layers", "diff_ids": diff_ids}}, sort_keys=True).encode(),
                  "application/vnd.oci.image.config.v1+json")
    manifest = Blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.descriptor(),
                                "layers": [b.descriptor() for b in layer_blobs]}, sort_keys=True).encode(),
                    OCI_MANIFEST)
    return manifest, [manifest, config, *layer_blobs]


def write_layout(directory: Path, top: Blob, blobs: list[Blob]) -> Path:
    """An OCI layout holding ``blobs`` with ``top`` (a manifest or an index) as its one image."""
    (directory / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    for blob in blobs:
        (directory / "blobs" / "sha256" / blob.digest.split(":", 1)[1]).write_bytes(blob.data)
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        top.descriptor(annotations={"org.opencontainers.image.ref.name": "latest"})]}))
    return directory


def multi_arch_blobs(layers: list[dict[str, bytes]]) -> tuple[Blob, list[Blob], Blob]:
    """(index, all blobs, the linux/amd64 manifest) of an OCI index for amd64 and arm64."""
    amd64, amd64_blobs = image_blobs(layers, "amd64")
    arm64, arm64_blobs = image_blobs([*layers, {"arm": b"arm64\n"}], "arm64")
    index = Blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        arm64.descriptor(platform={"architecture": "arm64", "os": "linux"}),
        amd64.descriptor(platform={"architecture": "amd64", "os": "linux"}),
    ]}, sort_keys=True).encode(), OCI_INDEX)
    return index, [index, *amd64_blobs, *arm64_blobs], amd64


class Registry:
    """One ``docker-registry`` process with TLS (and basic auth when ``user`` is given).

    ``tls=False`` serves plain HTTP (as the chart's in-cluster registry does behind its gateway);
    ``htpasswd_hash`` is the user's htpasswd hash as the caller made it (default: bcrypt here), and
    ``realm`` the basic-auth realm announced. ``address`` is the IPv4 address it listens on (and its
    certificate names): loopback unless a test VM must reach it (the libvirt network's host address)."""

    def __init__(self, base: Path, user: str | None = None, password: str | None = None, *, tls: bool = True,
                 htpasswd_hash: str | None = None, realm: str = "test", address: str = "127.0.0.1") -> None:
        self.base = base
        self.user, self.password = user, password
        self.tls, self.htpasswd_hash, self.realm = tls, htpasswd_hash, realm
        self.address = address
        self.port = _free_port(address)
        self.host = f"{address}:{self.port}"
        self.storage = base / "storage"
        self.ca_dir = base / "ca"  # skopeo --*-cert-dir: ca.crt
        self.process: subprocess.Popen[bytes] | None = None

    def _tls(self) -> tuple[Path, Path]:
        self.ca_dir.mkdir(parents=True, exist_ok=True)
        ca_key, ca_crt = self.base / "ca.key", self.ca_dir / "ca.crt"
        key, csr, crt = self.base / "server.key", self.base / "server.csr", self.base / "server.crt"
        ext = self.base / "ext.cnf"
        ext.write_text(f"subjectAltName=IP:{self.address}\nbasicConstraints=CA:FALSE\n")
        run = [
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
             "-keyout", str(ca_key), "-out", str(ca_crt)],
            ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={self.address}", "-keyout", str(key),
             "-out", str(csr)],
            ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt)],
        ]
        for argv in run:
            subprocess.run(argv, check=True, capture_output=True, timeout=60)
        return crt, key

    def start(self, timeout: float = 20) -> None:
        tls = ""
        if self.tls:
            crt, key = self._tls()
            tls = f"  tls:\n    certificate: {crt}\n    key: {key}\n"
        auth = ""
        if self.user:
            assert self.password is not None
            htpasswd = self.base / "htpasswd"
            hashed = self.htpasswd_hash or bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
            htpasswd.write_text(f"{self.user}:{hashed}\n")
            auth = f"auth:\n  htpasswd:\n    realm: {self.realm}\n    path: {htpasswd}\n"
        config = self.base / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}:{self.port}\n" + tls + auth
        )
        with open(self.base / "registry.log", "wb") as log:
            self.process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.base / 'registry.log').read_text()[-2000:]}")
            try:
                socket.create_connection((self.address, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"docker-registry did not listen on {self.host} within {timeout} s")

    def _creds(self) -> list[str]:
        return [f"--dest-creds={self.user}:{self.password}"] if self.user else []

    def push_layout(self, layout: Path, repo_tag: str, *, docker_v2: bool = False, all_images: bool = False) -> None:
        """``skopeo copy`` the layout's image to ``<this registry>/<repo_tag>``."""
        argv = ["skopeo", "copy", "--quiet", f"--dest-cert-dir={self.ca_dir}", *self._creds()]
        if docker_v2:
            argv.append("--format=v2s2")
        if all_images:
            argv.append("--all")
        argv += [f"oci:{layout}:latest", f"docker://{self.host}/{repo_tag}"]
        subprocess.run(argv, check=True, capture_output=True, timeout=120, env={**os.environ, "HOME": str(self.base)})

    def blob_downloads(self, since: int = 0) -> list[str]:
        """Digests of the blobs served (GET, status 200) after byte ``since`` of the access log."""
        found = []
        for line in (self.base / "registry.log").read_bytes()[since:].decode(errors="replace").splitlines():
            if '"GET /v2/' in line and "/blobs/" in line and '" 200 ' in line:
                found.append(line.split("/blobs/", 1)[1].split(" ", 1)[0])
        return found

    def log_size(self) -> int:
        return (self.base / "registry.log").stat().st_size

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        if self.process is None:
            return
        stop_processes([self.process.pid], grace=10)  # by PID: TERM, then KILL
        self.process.wait(timeout=10)
        self.process = None
