"""A verification receipt: what binds "this OVA passed verify" to the OVA, beyond ``state.json``.

``build/state.json`` is plain JSON: anyone who can write it can claim that any file, named with
its real sha256, was verified (issue 21: ``--only publish`` then published it as
``"verified": true``). So the verify stage also records a receipt: an HMAC-SHA256, under a
per-user key kept outside the build folder, over the verified OVA's sha256, the export digest
(the output settings it was exported with) and the verify report. Publish recomputes it from
what it is about to publish; a state.json written by anything but this tool's verify stage, on
this host and account, has no valid receipt and publishes nothing.

What is trusted: the key file (``$XDG_STATE_HOME/csghub-appliance/verify-key``, else
``~/.local/state/...``; 32 random bytes, 0600, made on first use). Whoever can read it (this
account, root) can mint receipts, as they could run ``invoke build-ova`` itself; a build
folder copied from elsewhere, or a state.json edited by hand, cannot. Deleting the key
invalidates every receipt: the next ``invoke build-ova`` verifies again.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import Any

from appliance.errors import HostFileError
from appliance.inputs import open_regular

KEY_BYTES = 32


def key_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "csghub-appliance" / "verify-key"


def _key() -> bytes:
    path = key_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        key = os.urandom(KEY_BYTES)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return key
    try:
        with open_regular(path) as f:
            mode = os.fstat(f.fileno()).st_mode
            key = f.read(KEY_BYTES + 1)
    except OSError as exc:
        raise HostFileError(f"cannot read the verification key {path}: {exc.strerror or exc}",
                            hint="remove it: the next build makes a new one and verifies again") from None
    if len(key) != KEY_BYTES or stat.S_IMODE(mode) & 0o077:
        raise HostFileError(f"the verification key {path} is not {KEY_BYTES} bytes readable only by its owner",
                            hint="remove it: the next build makes a new one and verifies again")
    return key


def _message(ova_sha256: str, export_digest: str, report: dict[str, Any]) -> bytes:
    return json.dumps({"ova_sha256": ova_sha256, "export_digest": export_digest, "report": report},
                      sort_keys=True, separators=(",", ":")).encode()


def issue(ova_sha256: str, export_digest: str, report: dict[str, Any]) -> str:
    """The receipt the verify stage records for an OVA that passed."""
    return hmac.new(_key(), _message(ova_sha256, export_digest, report), hashlib.sha256).hexdigest()


def holds(receipt: str, ova_sha256: str, export_digest: str, report: dict[str, Any]) -> bool:
    """Whether ``receipt`` was issued by this account's verify stage for exactly these facts."""
    if not receipt:
        return False
    try:
        expected = issue(ova_sha256, export_digest, report)
    except OSError as exc:  # pragma: no cover - a state folder that cannot be made
        if exc.errno in (errno.EACCES, errno.EROFS):
            return False
        raise
    return hmac.compare_digest(receipt, expected)
