"""A host check and the two ways it is used: a row of ``invoke doctor`` and a precondition that raises.

Below every provider and the doctor: a provider's probes return ``Check`` values, ``invoke doctor``
shows them as a table (``appliance.doctor``), and the preflight before ``vagrant up`` turns the
first that fails into ``PrerequisiteMissing`` (``require``): one probe, two uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from appliance.errors import PrerequisiteMissing
from appliance.run import run, which


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str  # "ok", "warn" or "fail"
    found: str
    fix: str = ""


def require(probes: Iterable[Callable[[], Check]]) -> None:
    """Run checks in order; the first that fails becomes ``PrerequisiteMissing`` (its fix as the hint)."""
    for probe in probes:
        check = probe()
        if check.verdict == "fail":
            raise PrerequisiteMissing(f"{check.name}: {check.found}", hint=check.fix or None)


def version_tuple(text: str) -> tuple[int, ...]:
    """``(2, 4, 9)`` from the first ``2.4.9``-like version in ``text``; ``()`` when there is none."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


def tool_check(name: str, program: str, fix: str, version_args: tuple[str, ...] = ("--version",)) -> Check:
    """Is ``program`` on PATH, and does it answer ``--version``?"""
    path = which(program)
    if path is None:
        return Check(name, "fail", f"{program} not found on PATH", fix)
    result = run([path, *version_args], check=False, timeout=60)
    first = (result.stdout or result.stderr).strip().splitlines()
    return Check(name, "ok" if result.ok else "warn", f"{path}: {first[0] if first else 'no version output'}", "")


def command_version(argv: list[str]) -> tuple[int, ...]:
    """The version a program prints for ``argv`` (``()`` when it is missing or fails)."""
    if which(argv[0]) is None:
        return ()
    res = run(argv, check=False, timeout=120)
    return version_tuple(res.stdout) if res.ok else ()
