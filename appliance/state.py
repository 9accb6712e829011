"""Build state: what a build has done so far, kept in ``build/state.json``.

The configuration is frozen; everything that changes during a build lives here, in typed
fields (not a string-keyed bag). The file is rewritten atomically after every stage, so an
interrupted build resumes from what the file says.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig, public_dump

STATE_VERSION = 1


def config_digest(cfg: ApplianceConfig) -> str:
    """A digest of the settings that shape the VM's contents (what a sealed VM was built from)."""
    data = public_dump(cfg)
    for volatile in ("output",):  # where artifacts go does not change the VM
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass
class BuildState:
    version: int = STATE_VERSION
    provider: str = ""
    vm_name: str = ""
    libvirt_driver: str = ""
    config_digest: str = ""
    completed: list[str] = field(default_factory=list)
    sealed: bool = False
    disk_image: str = ""
    staged_ova: str = ""
    staged_ova_sha256: str = ""
    verified_sha256: str = ""
    verify_report: dict[str, Any] = field(default_factory=dict)  # what verify checked (schema run or not)
    images: list[dict[str, str]] = field(default_factory=list)
    last_failure: str = ""
    updated: str = ""

    @classmethod
    def path_for(cls, build_dir: Path) -> Path:
        return build_dir / "state.json"

    @classmethod
    def load(cls, build_dir: Path) -> BuildState:
        path = cls.path_for(build_dir)
        try:
            raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError):
            # A state file we cannot read is treated as no state, but kept for inspection.
            path.replace(path.with_suffix(".json.unreadable"))
            return cls()
        known = {f.name for f in fields(cls)}
        if raw.get("version") != STATE_VERSION:
            return cls()
        return cls(**{k: v for k, v in raw.items() if k in known})

    def save(self, build_dir: Path) -> None:
        build_dir.mkdir(parents=True, exist_ok=True)
        self.updated = datetime.now(UTC).isoformat(timespec="seconds")
        path = self.path_for(build_dir)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def mark_done(self, stage: str) -> None:
        if stage not in self.completed:
            self.completed.append(stage)

    def forget_from(self, stage: str, order: list[str]) -> None:
        """Forget ``stage`` and every stage after it (their results are stale)."""
        later = set(order[order.index(stage):]) if stage in order else {stage}
        self.completed = [s for s in self.completed if s not in later]
