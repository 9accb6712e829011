"""The guest contract: what the provisioning steps may receive from the host.

Two vocabularies, both read by the steps' ``# appliance:`` headers (``appliance.scripts``) and
never by step name:

- **The guest environment** (``env=``): the variables :func:`guest_environment` makes from the
  settings named in :data:`SETTING_VARIABLES` plus a few derived ones
  (:data:`DERIVED_VARIABLES`). A step receives only the names it declares. The settings model
  (``appliance.config``) knows nothing of this; ``docs/configuration.md`` shows the names.
- **Needs** (``needs=``): what a step reads from the host besides its script and support files.
  Each name is one host provider (``appliance.needs.need_uploads``): the files it
  puts on the guest before the step runs, what ``invoke fetch`` and the build's fetch stage
  download for it, and the step marker entries (``upload:<guest path>``) that make a changed
  file rerun exactly the steps that need it.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
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


# The settings a step may receive, by variable name: the setting's key in the configuration.
SETTING_VARIABLES: dict[str, str] = {
    "APPLIANCE_HOSTNAME": "vm.hostname",
    "APPLIANCE_NAME": "output.name",
    "APPLIANCE_VERSION": "output.version",  # its value: the derived one below
    "CSGHUB_CHART_VERSION": "csghub.chart_version",
    "CSGHUB_DOMAIN": "csghub.domain",
    "CSGHUB_EDITION": "csghub.edition",
    "CSGHUB_IMAGE_REGISTRY": "csghub.image_registry",
    "K3S_EXTRA_ARGS": "k3s.extra_args",
    "K3S_NODE_IP": "k3s.node_ip",
    "K3S_VERSION": "k3s.version",
}
# Variables made from more than one setting, with what they hold.
DERIVED_VARIABLES: dict[str, str] = {
    "APPLIANCE_VERSION": "output.version, else csghub.chart_version",
    "CSGHUB_HTTP_PORT": "the guest port of the `http` forward (30080 without one)",
    "CSGHUB_GIT_SSH_PORT": "the guest port of the `git-ssh` forward (30022 without one): the readiness gate's "
                           "git check",
}


def variable_names() -> frozenset[str]:
    """Every name :func:`guest_environment` sets (they do not depend on the values)."""
    return frozenset(SETTING_VARIABLES) | frozenset(DERIVED_VARIABLES)


def setting_value(cfg: ApplianceConfig, key: str) -> Any:
    """The value of a dotted setting key (``k3s.version``)."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def guest_environment(cfg: ApplianceConfig) -> dict[str, str]:
    """The environment variables the provisioning scripts may receive (each step gets those it declares)."""
    env = {name: _env_value(setting_value(cfg, key)) for name, key in SETTING_VARIABLES.items()}
    env["APPLIANCE_VERSION"] = cfg.appliance_version
    http = cfg.http_port()
    env["CSGHUB_HTTP_PORT"] = str(http.guest if http else 30080)
    git = next((p for p in cfg.network.forwarded_ports if p.name == "git-ssh"), None)
    env["CSGHUB_GIT_SSH_PORT"] = str(git.guest if git else 30022)
    return dict(sorted(env.items()))


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return shlex.join(str(v) for v in value)
    return str(value)
