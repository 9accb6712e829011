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


# shellcheck's optional checks enforced on provision/: all of `-o all` but two.
#   - check-set-e-suppressed (SC2310) and check-extra-masked-returns (SC2312): a function called
#     in an `if`/`||`, or a command whose status a $(...) or pipeline drops, runs with its
#     failures unseen; the guest scripts must stop on them.
#   - add-default-case, avoid-nullary-conditions, deprecate-which, quote-safe-variables,
#     require-double-brackets: cheap, and each catches a real slip.
# Left out: check-unassigned-uppercase (a step's inputs are upper-case environment variables the
# runner sets, so every one would be flagged) and require-variable-braces (style: ${x} for $x).
SHELLCHECK_OPTIONAL = (
    "add-default-case,avoid-nullary-conditions,check-extra-masked-returns,check-set-e-suppressed,"
    "deprecate-which,quote-safe-variables,require-double-brackets"
)


def provision_shell_scripts() -> list[Path]:
    """Every bash file under provision/: the steps, the libraries and the guest tools without .sh."""
    out = []
    for path in sorted(p for p in (ROOT / "provision").rglob("*") if p.is_file()):
        head = path.read_text(errors="replace").splitlines()[:5]
        if path.suffix == ".sh" or (head and head[0].startswith("#!") and "bash" in head[0]) or \
                "# shellcheck shell=bash" in head:
            out.append(path)
    return out


def test_provision_script_list_covers_the_guest_tools() -> None:
    names = {p.name for p in provision_shell_scripts()}
    assert {"00-base.sh", "lib.sh", "readiness.sh", "csghub-firstboot", "csghub-ready", "csghub-status",
            "csghub-reconfigure", "csghub-banner", "k3s-killall.sh"} <= names
    assert not names & {"k3s.service", "csghub-ready.service", "sshd-csghub-appliance.conf"}


def test_shellcheck_clean() -> None:
    scripts = [str(p) for p in provision_shell_scripts()]
    proc = _run([_require("shellcheck"), "-x", "-o", SHELLCHECK_OPTIONAL, *scripts])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run([_require("shellcheck"), "-x", str(ROOT / "scripts" / "setup.sh"), str(ROOT / ".ci" / "run")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_enforces_the_set_e_checks() -> None:
    """The optional checks really run: a function in an `if` under set -e is refused."""
    script = "#!/bin/bash\nset -euo pipefail\nf() { false; }\nif f; then echo x; fi\necho \"$(f)\"\n"
    proc = subprocess.run([_require("shellcheck"), "-o", SHELLCHECK_OPTIONAL, "-"], input=script,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SC2310" in proc.stdout and "SC2312" in proc.stdout


def test_provision_scripts_are_strict_bash() -> None:
    for script in sorted((ROOT / "provision").glob("*.sh")):
        head = script.read_text().splitlines()[:30]
        assert head[0] in ("#!/usr/bin/env bash", "#!/bin/bash"), f"{script.name}: not a bash script"
        assert any(line.strip() == "set -euo pipefail" for line in head), f"{script.name}: missing set -euo pipefail"
