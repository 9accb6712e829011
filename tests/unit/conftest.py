"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT

# -- OVF / OVA (export and verify tests) ------------------------------------------------------

SHARED = (PROJECT_ROOT / ".." / "shared").resolve()
OVF_SCHEMAS = SHARED / "ovf" / "schemas"
OVF_SAMPLES = SHARED / "ovf" / "samples"


@pytest.fixture(scope="session")
def ovf_schema_dir() -> Path:
    """The DMTF schemas in ../shared (a read-only copy next to the clone in CI)."""
    if not (OVF_SCHEMAS / "ovf1").is_dir():
        pytest.skip(f"OVF schemas not found at {OVF_SCHEMAS} (the shared reference data sits next to the clone)")
    return OVF_SCHEMAS


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
