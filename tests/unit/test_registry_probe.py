"""The gate's registry probe (gate_registry_push_pull, provision/files/common/readiness.sh) against the REAL registry.

Debian's ``docker-registry`` is distribution 2.8 (the chart runs ``registry:2.8.3``), started here on loopback with
htpasswd auth as the chart configures it (templates/registry/configmap.yaml: realm "Registry Realm") and an htpasswd
line made as first boot makes it (secrets.sh's ``bcrypt_hash``), its own port and storage folder, stopped by PID.
The probe pushes a one-layer image with curl (blob uploads, manifest PUT) and pulls it back (manifest by tag, layer),
as ``docker push``/``pull`` do.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT

READINESS = PROJECT_ROOT / "provision" / "files" / "common" / "readiness.sh"
SECRETS = PROJECT_ROOT / "provision" / "files" / "firstboot" / "secrets.sh"
REGISTRY = shutil.which("docker-registry")
HOST = "csghub.localhost"


@dataclass
class Registry:
    port: int
    user: str
    password: str
    storage: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if REGISTRY is None:
        pytest.skip("docker-registry is not installed (scripts/setup.sh installs it)")
    root = tmp_path_factory.mktemp("registry")
    password = "pw-" + os.urandom(8).hex()
    hashed = subprocess.run(["bash", "-c", f'. {shlex.quote(str(SECRETS))}; bcrypt_hash "$1"', "_", password],
                            capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (root / "htpasswd").write_text(f"registry:{hashed}\n")
    port = _free_port()
    (root / "config.yml").write_text(
        "version: 0.1\n"
        "log: {level: error, accesslog: {disabled: true}}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'storage'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
        f"auth: {{htpasswd: {{realm: Registry Realm, path: {root / 'htpasswd'}}}}}\n")
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen([REGISTRY, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"docker-registry did not start: {(root / 'registry.log').read_text()[-500:]}")
                time.sleep(0.1)
        yield Registry(port, "registry", password, root / "storage")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def push_pull(registry: Registry, user: str, password: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "CSGHUB_HTTP_PORT": str(registry.port),
           "K3S_NODE_IP": "127.0.0.1"}
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; . {shlex.quote(str(READINESS))}; gate_registry_push_pull "$@"', "_",
         HOST, user, password], capture_output=True, text=True, env=env, timeout=120, check=False)


def test_the_copys_credentials_push_and_pull_an_image(registry: Registry) -> None:
    first = push_pull(registry, registry.user, registry.password)
    assert (first.returncode, first.stdout.strip(), first.stderr) == (0, "pushed", "")
    # Stored for real under the probe's repository; pushed again (every boot) it stores nothing new.
    repo = registry.storage / "docker" / "registry" / "v2" / "repositories" / "csghub-appliance" / "readiness"
    assert (repo / "_manifests" / "tags" / "probe").is_dir()
    blobs = sorted(p.relative_to(registry.storage) for p in registry.storage.rglob("data"))
    assert len(blobs) == 3  # layer, config, manifest
    assert push_pull(registry, registry.user, registry.password).stdout.strip() == "pushed"
    assert sorted(p.relative_to(registry.storage) for p in registry.storage.rglob("data")) == blobs


def test_credentials_the_htpasswd_does_not_take_are_refused(registry: Registry) -> None:
    assert push_pull(registry, registry.user, "another-copys-password").stdout.strip() == "refused layer-upload"
    assert push_pull(registry, "docker", registry.password).stdout.strip() == "refused layer-upload"


def test_nothing_answering_is_waiting(registry: Registry) -> None:
    gone = Registry(_free_port(), registry.user, registry.password, registry.storage)
    assert push_pull(gone, gone.user, gone.password).stdout.strip() == "waiting layer-upload 000"


def test_the_stand_in_answers_the_probe_as_the_real_registry_does(registry: Registry) -> None:
    """The registry part of tests/csghub_stand_in.py, which the gate's other tests use, against the real thing."""
    from tests.csghub_stand_in import Gateway, htpasswd_line, make_copy

    copy = make_copy("admin-pw", registry.password)
    services = copy.stand_in()
    services.htpasswd = htpasswd_line(registry.user, registry.password)
    gateway = Gateway(services)
    try:
        stand_in = Registry(gateway.port, registry.user, registry.password, registry.storage)
        for user, password in [(registry.user, registry.password), (registry.user, "wrong"), ("docker", "wrong")]:
            assert push_pull(stand_in, user, password).stdout == push_pull(registry, user, password).stdout
    finally:
        gateway.stop()
