"""A staged OVA as the export and verify stages leave it, for the publish tests.

A real OVA (our writer, from a small raw disk holding ``data``) and a state recording that the
verify stage passed it, with the receipt that stage issues (``appliance.receipt``): publish
re-checks the OVA's structure and the receipt, so random bytes and a hand-written state no
longer publish (issue 21).
"""

from __future__ import annotations

import os
from pathlib import Path

from appliance import receipt
from appliance.config import ApplianceConfig
from appliance.export.ova import write_ova
from appliance.state import BuildState, export_digest

VERIFY_REPORT = {"ovf_format": "ovf10", "checks": {"tar format": "checked"}, "boot": None}


def stage_verified_ova(cfg: ApplianceConfig, dest: Path, size: int = 4096, *, verified: bool = True) -> BuildState:
    dest.parent.mkdir(parents=True, exist_ok=True)
    raw = dest.parent / f".{dest.name}.raw"
    with raw.open("wb") as f:
        f.truncate(1 << 20)
        f.write(os.urandom(size))
    try:
        result = write_ova(raw, cfg, dest)
    finally:
        raw.unlink()
    state = BuildState(staged_ova=str(dest), staged_ova_sha256=result.sha256, export_digest=export_digest(cfg))
    if verified:
        state.verified_sha256 = result.sha256
        state.verify_report = dict(VERIFY_REPORT)
        state.verify_receipt = receipt.issue(result.sha256, state.export_digest, state.verify_report)
    return state
