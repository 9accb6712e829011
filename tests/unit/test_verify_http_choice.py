"""`invoke verify-ova` on its own lets the image's status line decide the HTTP check (issue 12, item 9).

The reproduction: an OVA built with `--skip k3s,csghub`, verified standalone with the default
configuration (which includes the stack), was refused after 902 s waiting for HTTP. Here:
what ``verify_from_config`` (which ``tasks.verify_ova`` calls with ``http`` None, True or False
for no flag, ``--http``, ``--no-http``) hands to ``verify_ova``, recorded instead of booted.
``http_skip_reason`` (test_verify.py) and the VM tier's first-boot test (the image's status
line says ``stack=absent``) cover the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance import verify
from appliance.config import load_config


@pytest.mark.parametrize(("http", "port_set", "if_stack"), [(None, True, True), (True, True, False),
                                                             (False, False, False)])
def test_standalone_verify_asks_the_image_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      http: bool | None, port_set: bool, if_stack: bool) -> None:
    seen: dict[str, Any] = {}

    def record(path: Path, **kwargs: Any) -> verify.VerifyReport:
        seen.update(kwargs)
        return verify.VerifyReport(path=path, checks=[("OVF schema", "checked")])

    monkeypatch.setattr(verify, "verify_ova", record)
    key = tmp_path / "key"
    key.write_text("unused: the boot is recorded, not run\n")
    cfg = load_config(None, ["provider=libvirt"], cwd=tmp_path)  # the defaults: the stack is part of the build
    assert cfg.stack_enabled
    ova = tmp_path / "x.ova"
    ova.write_bytes(b"unused: verify_ova is recorded\n")
    verify.verify_from_config(cfg, ova, boot=True, ssh_key=str(key), http=http, fetch_schemas=False)
    assert (seen["http_port"] is not None) is port_set
    assert seen["http_if_stack"] is if_stack

