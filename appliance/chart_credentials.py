"""Credentials in ``csghub.values``: which keys set a credential inside the appliance (refused: first
boot makes each per copy) and which reach a service outside it (accepted, with a warning).

Below ``appliance.config`` (whose validation asks it) and ``appliance.values`` (which asks it again
for the merged values): it reads plain data and imports neither.
"""

from __future__ import annotations

import re
from typing import Any

# Chart 2.4.0 (values.yaml and the templates that read it). Internal: a credential of a service
# that runs inside the appliance, which first boot makes per copy (docs/first-boot.md). External:
# a credential for something outside the appliance, which only the user can know.

# Keys (and everything under them) that set an internal credential.
INTERNAL_CREDENTIAL_KEYS: dict[str, str] = {
    "casdoor.admin.password": "the CSGHub admin (Casdoor root) password",
    "casdoor.applianceCerts": "Casdoor's JWT signing key pair",
    "casdoor.applianceRadiusSecret": "Casdoor's RADIUS secret",
    "gitaly.applianceJwtSecret": "the key of csghub-server's internal API (Gitaly, gitlab-shell)",
    "server.xnet.apiToken": "the hub API token (xnet)",
    "server.xnet.apiKey": "the hub API token (xnet)",
    "server.agenticflow.token": "the AgenticHub token",
    "server.memory.apiKey": "the memory service API key",
    "prometheus.gatewayAuth.htpasswd": "Prometheus's gateway login",
    "loki.gatewayAuth.htpasswd": "Loki's gateway login",
}
# Internal unless the sibling key points the client at a service outside the appliance.
EXTERNAL_WITH_SIBLING = {"server.agenticflow.token": "host", "server.memory.apiKey": "host"}
# Leaf names that hold a credential wherever they appear.
CREDENTIAL_LEAVES = frozenset({
    "password", "passwd", "token", "apiToken", "apiKey", "secretKey", "accessKey", "accessKeyId",
    "accessKeySecret", "appSecret", "secret", "clientSecret", "htpasswd", "privateKey",
})
# Environment variables the chart itself sets to a credential of a service inside the appliance (in the
# ConfigMaps, Secrets and container environments of chart 2.4.0, both editions; tests/unit/test_values.py holds this
# list against a real render), and the ones first boot adds to the copy's values (secrets.sh, secret_values_yaml:
# STARHUB_SERVER_GITALY_JWT_SECRET, the key of csghub-server's internal API, which the chart leaves at csghub-server's
# default "signing-key"). Setting one through `<...>.environments.<NAME>` replaces the copy's own value.
CHART_ENV_CREDENTIALS = frozenset({
    "ADMIN_CLIENT_SECRET", "CASDOOR_ADMIN_CLIENT_SECRET", "CSGHUB_API_ACCESS_TOKEN", "CSGHUB_CLIENT_SECRET",
    "CSGHUB_PORTAL_PRIVATE_S3_ACCESS_KEY_ID", "CSGHUB_PORTAL_PRIVATE_S3_ACCESS_KEY_SECRET",
    "CSGHUB_PORTAL_S3_ACCESS_KEY_ID", "CSGHUB_PORTAL_S3_ACCESS_KEY_SECRET", "CSGHUB_PORTAL_STARHUB_API_KEY",
    "DATABASE_PASSWORD", "FLOWS_ACCESS_TOKEN", "GITALY_TOKEN", "INIT_ADMIN_HTPASSWD", "INIT_ADMIN_PASSWORD",
    "LANGFLOW_SECRET_KEY", "MINIO_ROOT_PASSWORD", "NATS_PASSWORD", "OPENCSG_AGENT_AGENTHUB_SERVICE_TOKEN",
    "OPENCSG_MEMORY_SERVER_API_KEY", "PGPASSWORD", "POSTGRES_PASSWORD", "POSTGRE_PASSWORD", "REGISTRY_PASSWORD",
    "REGISTRY_STORAGE_S3_SECRETKEY", "STARHUB_JWT_SIGNING_KEY", "STARHUB_SERVER_API_TOKEN",
    "STARHUB_SERVER_CASDOOR_CLIENT_SECRET", "STARHUB_SERVER_GITALY_TOKEN", "STARHUB_SERVER_S3_ACCESS_KEY_ID",
    "STARHUB_SERVER_S3_ACCESS_KEY_SECRET", "STARHUB_SERVER_SPACE_SESSION_SECRET_KEY", "STARHUB_SERVER_XNET_API_KEY",
    "STARHUB_SERVER_CASDOOR_CLIENT_ID", "CASDOOR_ADMIN_CLIENT_ID", "REDIS_PASSWD", "NATS_USERNAME",
    "MINIO_ROOT_USER", "REGISTRY_USERNAME", "STARHUB_SERVER_GITALY_JWT_SECRET",
})
# An environment variable named like a credential (a value, not the name of a Secret or a setting about one).
ENV_CREDENTIAL_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|SIGNING_KEY|SECRET_?KEY|ACCESS_KEY"
                                 r"|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)
ENV_NOT_A_CREDENTIAL = re.compile(r"(_PATH|_FILE|_REALM|_PULL_SECRET|_SECRET_NAME|_BUCKET|_ENDPOINT|_REGION"
                                  r"|_ENABLE_SSL)$", re.IGNORECASE)
# Services' connections to outside systems: the chart's "external" settings.
EXTERNAL_SECTIONS = ("postgresql", "redis", "objectStore")
# What makes a service's own <service>.<section>.* point outside: without it the chart keeps the inside host
# (charts/common/templates/_postgres.tpl and friends merge the service's keys over the inside defaults).
EXTERNAL_SECTION_HOST = {"postgresql": ("host",), "redis": ("host",), "objectStore": ("endpoint", "host")}
EXTERNAL_KEYS = ("notifier.smtp.password", "notifier.feiShu.appSecret")
EXTERNAL_PREFIXES = ("aigateway.moderation.", "memmachine.model.")


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, (*path, str(k)))]
    return [(path, node)]


def _node(values: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        values = values.get(part) if isinstance(values, dict) else None
    return values


def _is_external(path: tuple[str, ...], values: Any = None) -> bool:
    dotted = ".".join(path)
    if len(path) >= 4 and path[0] == "global" and path[2] == "external":
        return True  # global.<service>.external.<key>: the chart's own word for it
    if len(path) >= 3 and path[-2] in EXTERNAL_SECTIONS:
        # <service>.postgresql.password and the like: outside only when that section names an outside host.
        section = _node(values, path[:-1])
        return isinstance(section, dict) and any(section.get(k) for k in EXTERNAL_SECTION_HOST[path[-2]])
    return dotted in EXTERNAL_KEYS or dotted.startswith(EXTERNAL_PREFIXES)


def _env_finding(path: tuple[str, ...]) -> tuple[str, str] | None:
    """("refused"|"warned", message) for a leaf under an `environments` map, by the variable it sets."""
    if "environments" not in path[:-1]:
        return None
    name = path[-1]
    if name in CHART_ENV_CREDENTIALS:
        return "refused", (
            f"must not be set: the environment variable {name} is a credential the chart sets for a service inside "
            "the appliance; every imported copy would share it, and each copy makes its own at first boot "
            "(docs/first-boot.md lists them)")
    if ENV_CREDENTIAL_NAME.search(name) and not ENV_NOT_A_CREDENTIAL.search(name):
        return "warned", (
            f"the environment variable {name} looks like a credential for a service outside the appliance: "
            "accepted, but every copy of the OVA will carry it as given")
    return None


def chart_credential_findings(values: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Credentials set in ``csghub.values``: (refused, warned), each a list of (config key, message).

    Refused: a credential of a service inside the appliance (every copy would share it; each copy
    makes its own at first boot). Warned: one for a service outside the appliance, which every copy
    will carry as given.
    """
    refused: list[tuple[str, str]] = []
    warned: list[tuple[str, str]] = []
    for path, value in _leaves(values if isinstance(values, dict) else {}):
        if value is None or value == "" or value == {} or value == []:
            continue
        dotted = ".".join(path)
        key = f"csghub.values.{dotted}"
        env = _env_finding(path)
        if env is not None:
            (refused if env[0] == "refused" else warned).append((key, env[1]))
            continue
        internal = next((k for k in INTERNAL_CREDENTIAL_KEYS if dotted == k or dotted.startswith(k + ".")), None)
        external = _is_external(path, values)
        if internal in EXTERNAL_WITH_SIBLING:
            sibling = (*internal.split(".")[:-1], EXTERNAL_WITH_SIBLING[internal])
            node: Any = values
            for part in sibling:
                node = node.get(part) if isinstance(node, dict) else None
            if node:  # the client points at a service outside the appliance
                internal, external = None, True
        if internal is not None:
            refused.append((key, (
                f"must not be set: it is {INTERNAL_CREDENTIAL_KEYS[internal]}, a credential inside the appliance; "
                "every imported copy would share it, and each copy makes its own at first boot "
                "(docs/first-boot.md lists them)")))
        elif path[-1] in CREDENTIAL_LEAVES:
            if external:
                warned.append((key, (
                    "a credential for a service outside the appliance: accepted, but every copy of the OVA "
                    "will carry it as given")))
            elif len(path) >= 3 and path[-2] in EXTERNAL_SECTIONS:
                hosts = " or ".join(f"csghub.values.{'.'.join(path[:-1])}.{h}" for h in EXTERNAL_SECTION_HOST[path[-2]])
                refused.append((key, (
                    f"must not be set without {hosts}: the chart then uses it for the {path[-2]} inside the "
                    "appliance, and each copy makes its own at first boot; name the outside service's host to "
                    "use one of yours")))
            else:
                refused.append((key, (
                    "must not be set: a credential of a service inside the appliance would be the same in every "
                    "imported copy, and each copy makes its own at first boot (docs/first-boot.md lists them)")))
    return refused, warned
