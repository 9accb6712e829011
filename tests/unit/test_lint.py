"""Lint as tests: ruff, mypy --strict on appliance/, shellcheck on provision/.

Each skips where its tool is missing on a developer's machine, and fails in CI (CI=true),
where scripts/setup.sh installs them all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is required in CI (scripts/setup.sh installs it)")
        pytest.skip(f"{tool} not installed")
    return found


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_clean() -> None:
    proc = _run([_require("ruff"), "check", "."])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_clean() -> None:
    pytest.importorskip("mypy")
    proc = _run([sys.executable, "-m", "mypy", "--strict", "appliance"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_clean() -> None:
    scripts = sorted(str(p) for p in (ROOT / "provision").rglob("*.sh"))
    scripts += [str(ROOT / "scripts" / "setup.sh"), str(ROOT / ".ci" / "run")]
    proc = _run([_require("shellcheck"), "-x", *scripts])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_provision_scripts_are_strict_bash() -> None:
    for script in sorted((ROOT / "provision").glob("*.sh")):
        head = script.read_text().splitlines()[:30]
        assert head[0] in ("#!/usr/bin/env bash", "#!/bin/bash"), f"{script.name}: not a bash script"
        assert any(line.strip() == "set -euo pipefail" for line in head), f"{script.name}: missing set -euo pipefail"
