"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT
from tests.containerd import Containerd, containerd_missing

# -- containerd (image names and archives, tests/containerd.py) ---------------------------------------


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A real containerd on a private socket for the module, stopped by PID; CI must have it."""
    why = containerd_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    daemon = Containerd(tmp_path_factory.mktemp("containerd"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


# -- OVF / OVA (export and verify tests) ------------------------------------------------------

SHARED = (PROJECT_ROOT / ".." / "shared").resolve()
OVF_SCHEMAS = SHARED / "ovf" / "schemas"
OVF_SAMPLES = SHARED / "ovf" / "samples"


@pytest.fixture(scope="session")
def ovf_schema_mirror() -> Iterator[str]:
    """A loopback HTTP mirror of the DMTF schemas in ../shared (``<base>/ovf1/<file>``, ``<base>/ovf2/<file>``)."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    if not (OVF_SCHEMAS / "ovf1").is_dir():
        pytest.skip(f"OVF schemas not found at {OVF_SCHEMAS} (the shared reference data sits next to the clone)")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(OVF_SCHEMAS)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def ovf_schema_dir(ovf_schema_mirror: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned DMTF schemas, fetched once per session through the real code from the loopback mirror of
    ../shared into a private cache: the folder ``verify-ova`` validates with (and proof the pins match ../shared)."""
    from appliance.artifacts import fetch_ovf_schemas
    from appliance.config import load_config

    cache = tmp_path_factory.mktemp("ovf-schema-cache")
    cfg = load_config(None, [f"artifacts.cache_dir={cache}", f"artifacts.ovf_schema_mirror={ovf_schema_mirror}"],
                      "libvirt", cwd=cache)
    return fetch_ovf_schemas(cfg)


@pytest.fixture(scope="session")
def ovf_samples_dir() -> Path:
    if not OVF_SAMPLES.is_dir():
        pytest.skip(f"OVF samples not found at {OVF_SAMPLES} (the shared reference data sits next to the clone)")
    return OVF_SAMPLES


# -- the real CSGHub chart, rendered by a real helm ---------------------------------------------


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """A real helm (scripts/install-helm.sh); in CI a missing one fails, elsewhere it skips with the fix."""
    import os

    from tests.chart import CHART_DIR, helm_binary

    helm = helm_binary()
    problem = None
    if helm is None:
        problem = "helm not found: run scripts/install-helm.sh (or set APPLIANCE_HELM)"
    elif not (CHART_DIR / "Chart.yaml").is_file():
        problem = f"the CSGHub chart is not at {CHART_DIR} (the shared reference data sits next to the clone)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    assert helm is not None
    return helm
