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
import subprocess
from collections.abc import Iterator

import pytest

from appliance.config import PROJECT_ROOT
from tests.registry import Registry

READINESS = PROJECT_ROOT / "provision" / "files" / "common" / "readiness.sh"
SECRETS = PROJECT_ROOT / "provision" / "files" / "firstboot" / "secrets.sh"
HOST = "csghub.localhost"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The real registry as the chart configures it: plain HTTP behind the gateway, htpasswd realm
    "Registry Realm" (templates/registry/configmap.yaml), the line made by secrets.sh's ``bcrypt_hash``."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (scripts/setup.sh installs it)")
    password = "pw-" + os.urandom(8).hex()
    hashed = subprocess.run(["bash", "-c", f'. {shlex.quote(str(SECRETS))}; bcrypt_hash "$1"', "_", password],
                            capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    reg = Registry(tmp_path_factory.mktemp("registry"), "registry", password, tls=False, htpasswd_hash=hashed,
                   realm="Registry Realm")
    try:
        reg.start(timeout=30)
        yield reg
    finally:
        reg.stop()


def push_pull(port: int, user: str, password: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "CSGHUB_HTTP_PORT": str(port),
           "K3S_NODE_IP": "127.0.0.1"}
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; . {shlex.quote(str(READINESS))}; gate_registry_push_pull "$@"', "_",
         HOST, user, password], capture_output=True, text=True, env=env, timeout=120, check=False)


def test_the_copys_credentials_push_and_pull_an_image(registry: Registry) -> None:
    first = push_pull(registry.port, registry.user, registry.password)
    assert (first.returncode, first.stdout.strip(), first.stderr) == (0, "pushed", "")
    # Stored for real under the probe's repository; pushed again (every boot) it stores nothing new.
    repo = registry.storage / "docker" / "registry" / "v2" / "repositories" / "csghub-appliance" / "readiness"
    assert (repo / "_manifests" / "tags" / "probe").is_dir()
    blobs = sorted(p.relative_to(registry.storage) for p in registry.storage.rglob("data"))
    assert len(blobs) == 3  # layer, config, manifest
    assert push_pull(registry.port, registry.user, registry.password).stdout.strip() == "pushed"
    assert sorted(p.relative_to(registry.storage) for p in registry.storage.rglob("data")) == blobs


def test_credentials_the_htpasswd_does_not_take_are_refused(registry: Registry) -> None:
    assert push_pull(registry.port, registry.user, "another-copys-password").stdout.strip() == "refused layer-upload"
    assert push_pull(registry.port, "docker", registry.password).stdout.strip() == "refused layer-upload"


def test_nothing_answering_is_waiting(registry: Registry) -> None:
    from appliance.verify_boot import free_loopback_port

    gone = free_loopback_port()  # nothing listens there
    assert push_pull(gone, registry.user, registry.password).stdout.strip() == "waiting layer-upload 000"


def test_the_stand_in_answers_the_probe_as_the_real_registry_does(registry: Registry) -> None:
    """The registry part of tests/csghub_stand_in.py, which the gate's other tests use, against the real thing."""
    from tests.csghub_stand_in import Gateway, htpasswd_line, make_copy

    copy = make_copy("admin-pw", registry.password)
    services = copy.stand_in()
    services.htpasswd = htpasswd_line(registry.user, registry.password)
    gateway = Gateway(services)
    try:
        for user, password in [(registry.user, registry.password), (registry.user, "wrong"), ("docker", "wrong")]:
            assert push_pull(gateway.port, user, password).stdout == push_pull(registry.port, user, password).stdout
    finally:
        gateway.stop()
