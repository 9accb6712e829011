"""The real CSGHub chart 2.4.0 rendered by a real helm, for tests that must agree with what a real install gets.

The chart lives in ``../shared/csghub-chart/2.4.0/chart/csghub`` (the whole chart of tag v2.4.0, laid out to render
offline; remote subcharts are empty placeholders). ``scripts/install-helm.sh`` (run by ``scripts/setup.sh``) puts a
pinned helm 3.17 into the user's cache; ``$APPLIANCE_HELM`` or a ``helm`` on PATH are used instead when set/present.
Tests call ``render_chart`` through the ``chart_render`` fixture, which skips (outside CI) when helm or the chart is
missing; in CI both must be there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# $APPLIANCE_CHART_DIR: for a checkout that does not sit next to ../shared (e.g. a git worktree).
CHART_DIR = Path(os.environ.get("APPLIANCE_CHART_DIR")
                 or PROJECT_ROOT / ".." / "shared" / "csghub-chart" / "2.4.0" / "chart" / "csghub").resolve()
HELM_VERSION = "v3.17.3"  # scripts/install-helm.sh pins the same


def helm_binary() -> Path | None:
    """The helm to render with: $APPLIANCE_HELM, then the pinned one in the cache, then PATH."""
    explicit = os.environ.get("APPLIANCE_HELM")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    pinned = cache / "csghub-appliance" / "tools" / f"helm-{HELM_VERSION}" / "helm"
    if pinned.is_file():
        return pinned
    found = shutil.which("helm")
    return Path(found) if found else None


def kubectl_binary() -> Path | None:
    """The kubectl that talks to the tests' API server: $APPLIANCE_KUBECTL, then the pinned one beside the pinned
    helm (scripts/install-helm.sh takes both from the same package), then PATH."""
    explicit = os.environ.get("APPLIANCE_KUBECTL")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    pinned = cache / "csghub-appliance" / "tools" / f"helm-{HELM_VERSION}" / "kubectl"
    if pinned.is_file():
        return pinned
    found = shutil.which("kubectl")
    return Path(found) if found else None


def render_chart(helm: Path, values: Mapping[str, Any] | None = None, *, values_files: list[Path] | None = None,
                 release: str = "csghub", namespace: str = "csghub", chart: Path = CHART_DIR) -> list[dict[str, Any]]:
    """``helm template`` the chart with the given values; returns every rendered object (empty documents dropped).

    ``values`` is written to a temporary file and passed after ``values_files`` (so it wins, like a later ``-f``).
    """
    args = [str(helm), "template", release, str(chart), "-n", namespace]
    for path in values_files or []:
        args += ["-f", str(path)]
    tmp: Path | None = None
    try:
        if values is not None:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="values-", suffix=".yaml")
            with os.fdopen(fd, "w") as fh:
                yaml.safe_dump(dict(values), fh)
            tmp = Path(name)
            args += ["-f", str(tmp)]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"helm template failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if isinstance(doc, dict)]


_RENDERED: dict[tuple[str, str, str], list[dict[str, Any]]] = {}


def render_chart_once(helm: Path, values: Mapping[str, Any], *, chart: Path = CHART_DIR) -> list[dict[str, Any]]:
    """``render_chart(helm, values)``, with helm run once per session for each distinct (helm, chart, values).

    For tests that read what the chart makes of our values (several render the very same values: the default
    config of each edition). The values are ours and deterministic, so the same input is the same render; each
    caller gets its own deep copy to change at will. A test that compares two renders of the same values (to see
    what the chart randomises) must call ``render_chart`` itself.
    """
    import copy
    import json

    key = (str(helm), str(chart), json.dumps(values, sort_keys=True, default=str))
    if key not in _RENDERED:
        _RENDERED[key] = render_chart(helm, values, chart=chart)
    return copy.deepcopy(_RENDERED[key])


def objects_of_kind(objects: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    return (obj for obj in objects if obj.get("kind") == kind)
