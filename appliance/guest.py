"""The guest contract: what the provisioning steps may receive from the host.

Two vocabularies, both read by the steps' ``# appliance:`` headers (``appliance.scripts``) and
never by step name:

- **The guest environment** (``env=``): the variables :func:`guest_environment` makes from the
  settings marked ``json_schema_extra={"env": NAME}`` in ``appliance.config`` plus a few derived
  ones. A step receives only the names it declares.
- **Needs** (``needs=``): what a step reads from the host besides its script and support files.
  Each name is one host provider (``appliance.needs.need_uploads``): the files it
  puts on the guest before the step runs, what ``invoke fetch`` and the build's fetch stage
  download for it, and the step marker entries (``upload:<guest path>``) that make a changed
  file rerun exactly the steps that need it.
"""

from __future__ import annotations

import shlex
from typing import Any

from pydantic import BaseModel

from appliance.config import ApplianceConfig

NEED_K3S_BINARY = "k3s-binary"
NEED_K3S_IMAGES = "k3s-images"
NEED_CHART = "chart"
NEED_MANIFESTS = "manifests"
NEED_IMAGE_SET = "image-set"

# Every need a step may declare, with what the host provides for it (docs/provisioning.md lists them).
NEEDS: dict[str, str] = {
    NEED_K3S_BINARY: "the pinned k3s binary (k3s.version), verified in the artifact cache",
    NEED_K3S_IMAGES: "k3s's pinned air-gap image bundle for that version",
    NEED_CHART: "the pinned CSGHub chart archive (csghub.chart_version)",
    NEED_MANIFESTS: "the Kubernetes manifests generated from the settings (HelmChart with the values, CoreDNS, "
                    "network policy)",
    NEED_IMAGE_SET: "the image set computed from the rendered chart (images.txt) and, when every image is pinned "
                    "and cached, their archive: the guest never pulls",
}


def guest_environment(cfg: ApplianceConfig) -> dict[str, str]:
    """The environment variables the provisioning scripts receive, from fields marked ``env``."""
    env: dict[str, str] = {}

    def walk(model: BaseModel) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            extra = field.json_schema_extra
            if isinstance(extra, dict) and "env" in extra:
                env[str(extra["env"])] = _env_value(value)
            elif isinstance(value, BaseModel):
                walk(value)

    walk(cfg)
    env["APPLIANCE_VERSION"] = cfg.appliance_version
    http = cfg.http_port()
    env["CSGHUB_HTTP_PORT"] = str(http.guest if http else 30080)
    git = next((p for p in cfg.network.forwarded_ports if p.name == "git-ssh"), None)
    env["CSGHUB_GIT_SSH_PORT"] = str(git.guest if git else 30022)  # the readiness gate's git check
    return dict(sorted(env.items()))


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return shlex.join(str(v) for v in value)
    return str(value)
