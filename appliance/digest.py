"""The one way the appliance hashes a file: sha256 through ``hashlib.file_digest``.

``file_digest`` reads into one reused buffer and releases the GIL while hashing, so a file
of gigabytes costs no more memory than a small one and a hash can run beside other work.
Code that hashes bytes while it copies or sends them (uploads, publishing) hashes those
bytes itself; this is for a file at rest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The sha256 of ``path``'s bytes, as 64 lowercase hex digits; a FIFO, directory or device is refused
    (``appliance.inputs.NotRegularFile``) instead of blocking or reading forever."""
    from appliance.inputs import open_regular

    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
