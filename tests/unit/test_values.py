"""Helm values: validated against chart 2.4.0's own values.schema.json, names as documented.

The schema and default values are byte-identical copies of the chart's files in
``../shared/csghub-chart/2.4.0`` (see its README); without them these tests skip and say so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from appliance.config import PROJECT_ROOT, ApplianceConfig, deep_merge, load_config
from appliance.errors import ConfigError
from appliance.values import chart_hostnames, emit_values, generate_values, persistence_plan

CHART_DIR = PROJECT_ROOT.parent / "shared" / "csghub-chart" / "2.4.0"
CASES = yaml.safe_load((PROJECT_ROOT / "tests" / "data" / "values_cases.yaml").read_text())
NETWORKING_DOC = PROJECT_ROOT / "docs" / "networking.md"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema_file = CHART_DIR / "values.schema.json"
    if not schema_file.is_file():
        pytest.skip(f"chart schema not found at {schema_file} (the shared/ copy of csghub-charts v2.4.0)")
    schema = json.loads(schema_file.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def chart_defaults() -> dict[str, Any]:
    values_file = CHART_DIR / "values.yaml"
    if not values_file.is_file():
        pytest.skip(f"chart values not found at {values_file}")
    data: dict[str, Any] = yaml.safe_load(values_file.read_text())
    return data


def dig(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_values_case(case: dict[str, Any], validator: jsonschema.Draft7Validator,
                     chart_defaults: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(ConfigError) as err:
            generate_values(load_config(None, case["set"]))
        assert case["error"] in str(err.value)
        return
    values = generate_values(load_config(None, case["set"]))
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(values)]
    assert errors == []
    # What Helm will actually render from: the chart's defaults with ours merged over them.
    effective = deep_merge(chart_defaults, values)
    assert [e.message for e in validator.iter_errors(effective)] == []
    assert effective["global"]["gateway"]["service"]["type"] == "NodePort"
    if "node_ports" in case:
        assert values["global"]["gateway"]["service"]["nodePorts"] == case["node_ports"]
    if "edition" in case:
        assert values["global"]["edition"] == case["edition"]
    names = chart_hostnames(effective)
    for key, expected in case.get("hostnames", {}).items():
        assert names[key] == expected, key
    for key, expected in case.get("expect", {}).items():
        assert dig(values, key) == expected, key


def test_node_ports_are_integers_the_schema_insists(validator: jsonschema.Draft7Validator) -> None:
    values = generate_values(load_config(None, []))
    ports = values["global"]["gateway"]["service"]["nodePorts"]
    assert all(type(p) is int for p in ports.values())
    # The schema really checks it: a string port is an error (so the test above can fail).
    broken = deep_merge(values, {"global": {"gateway": {"service": {"nodePorts": {"http": "30080"}}}}})
    assert any("is not of type 'integer'" in e.message for e in validator.iter_errors(broken))


def test_no_admin_password_anywhere() -> None:
    text = yaml.safe_dump(generate_values(load_config(None, [])))
    assert "password" not in text.lower()


def test_every_volume_is_read_write_once_on_local_path() -> None:
    values = generate_values(load_config(None, []))
    found = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "accessModes" in node:
                found.append(path)
                assert node["accessModes"] == ["ReadWriteOnce"], path
                assert node["storageClass"] == "local-path", path
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)

    walk(values, "")
    assert "dataflow.dataflow.persistence" in found  # the one CSGHub's docs want RWX for


@pytest.mark.parametrize("disk_gb", [148, 200, 500, 2000])
def test_volumes_fit_the_disk(disk_gb: int) -> None:
    cfg = load_config(None, [f"vm.disk_gb={disk_gb}"])
    plan = persistence_plan(cfg)
    disk_gib = disk_gb * 10**9 / 2**30
    # The named volumes plus 5Gi defaults for the few unnamed ones, plus the system reserve.
    assert sum(plan.values()) + 50 <= disk_gib
    assert plan["minio"] > plan["gitaly"] > plan["postgresql"] >= 5


def test_hostnames_match_the_networking_doc() -> None:
    """docs/networking.md's table of names is what the generator and the chart produce."""
    text = NETWORKING_DOC.read_text()
    block = text.split("<!-- names-table -->", 2)[1]
    rows = [
        [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        for line in block.splitlines()
        if line.startswith("|") and not re.match(r"^\|\s*-", line) and "csghub.domain" not in line
    ]
    assert len(rows) >= 2
    for domain, portal_url, login_host, wildcard in rows:
        values = generate_values(load_config(None, [f"csghub.domain={domain}"]))
        names = chart_hostnames(values)
        assert names["url"] == portal_url
        assert names["casdoor"] == login_host
        assert names["public_wildcard"] == wildcard


def test_values_written_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, [])
    assert emit_values(cfg) is None
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed) == generate_values(cfg)
    out = emit_values(cfg, str(tmp_path / "values.yaml"))
    assert out is not None and out.read_text() == printed
    assert [p.name for p in tmp_path.iterdir()] == ["values.yaml"]


@pytest.mark.parametrize(("values", "refused", "warned"), [
    ({"casdoor": {"admin": {"password": "x"}}}, ["casdoor.admin.password"], []),
    ({"global": {"objectStore": {"external": {"accessKey": "a", "secretKey": "b", "endpoint": "http://s3"}}}},
     [], ["global.objectStore.external.accessKey", "global.objectStore.external.secretKey"]),
    ({"server": {"postgresql": {"password": "p", "host": "db.example.com"}, "redis": {"password": "r", "host": "r"},
                 "objectStore": {"secretKey": "s", "endpoint": "http://s3.example.com"}}},
     [], ["server.postgresql.password", "server.redis.password", "server.objectStore.secretKey"]),
    # Without an outside host the chart points them at the database, cache and store inside (issue 19).
    ({"server": {"postgresql": {"password": "p"}, "redis": {"password": "r"}, "objectStore": {"secretKey": "s"}}},
     ["server.postgresql.password", "server.redis.password", "server.objectStore.secretKey"], []),
    ({"server": {"environments": {"STARHUB_JWT_SIGNING_KEY": "j", "OPENAI_API_KEY": "o", "GIN_MODE": "release"}},
      "postgresql": {"environments": {"POSTGRES_PASSWORD": "p"}}},
     ["server.environments.STARHUB_JWT_SIGNING_KEY", "postgresql.environments.POSTGRES_PASSWORD"],
     ["server.environments.OPENAI_API_KEY"]),
    ({"notifier": {"smtp": {"password": "m"}, "feiShu": {"appSecret": "f"}},
      "aigateway": {"moderation": {"accessKeyId": "i", "llm": {"apiKey": "k"}}}},
     [], ["notifier.smtp.password", "notifier.feiShu.appSecret", "aigateway.moderation.accessKeyId",
          "aigateway.moderation.llm.apiKey"]),
    ({"server": {"memory": {"apiKey": "k"}}}, ["server.memory.apiKey"], []),
    ({"server": {"memory": {"apiKey": "k", "host": "http://mem.example.com"}}}, [], ["server.memory.apiKey"]),
    ({"loki": {"gatewayAuth": {"htpasswd": "u:h"}}, "registry": {"password": "x"}},
     ["loki.gatewayAuth.htpasswd", "registry.password"], []),
    # Not credentials, or empty: nothing to say.
    ({"global": {"image": {"pullSecrets": ["regcred"]}, "gateway": {"tls": {"secretName": "tls"}}},
      "casdoor": {"admin": {"password": ""}}, "redis": {"requirePass": True}}, [], []),
])
def test_chart_credentials_are_refused_inside_and_warned_outside(values: dict[str, Any], refused: list[str],
                                                                 warned: list[str]) -> None:
    from appliance.chart_credentials import chart_credential_findings

    got_refused, got_warned = chart_credential_findings(values)
    assert [k for k, _ in got_refused] == [f"csghub.values.{k}" for k in refused]
    assert [k for k, _ in got_warned] == [f"csghub.values.{k}" for k in warned]
    assert all("each copy makes its own" in m for _, m in got_refused)
    assert all("every copy of the OVA will carry it" in m for _, m in got_warned)


def test_external_credential_warns_when_the_config_loads(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, ["csghub.values.global.postgresql.external.password=s3cret"])
    assert cfg.csghub.values["global"]["postgresql"]["external"]["password"] == "s3cret"
    out = capsys.readouterr()
    assert "csghub.values.global.postgresql.external.password" in out.out + out.err
    assert "every copy of the OVA will carry it" in out.out + out.err
    assert "s3cret" not in out.out + out.err


def test_cli_refuses_an_internal_credential_with_exit_2(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "invoke", "config", "--set", "csghub.values.nats.password=x"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "csghub.values.nats.password" in proc.stderr
    assert "each copy makes its own" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_env_credential_table_covers_what_the_chart_sets(helm_bin: Path,
                                                         make_cfg: Callable[..., ApplianceConfig]) -> None:
    """Every credential-named variable the chart renders (ConfigMap/Secret keys, container env, both editions) is
    one `<...>.environments.<NAME>` may not set: the table in appliance/values.py cannot fall behind the chart."""
    from appliance.chart_credentials import CHART_ENV_CREDENTIALS, ENV_CREDENTIAL_NAME, ENV_NOT_A_CREDENTIAL
    from tests.chart import render_chart_once

    rendered: set[str] = set()
    for edition in ("ce", "ee"):
        cfg = make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192", f"csghub.edition={edition}")
        for obj in render_chart_once(helm_bin, generate_values(cfg)):
            names = list(obj.get("data") or {}) if obj["kind"] in ("ConfigMap", "Secret") else []
            pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
            for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
                names += [e["name"] for e in container.get("env") or []]
            rendered |= {n for n in names if re.fullmatch(r"[A-Z][A-Z0-9_]*", n) and ENV_CREDENTIAL_NAME.search(n)
                         and not ENV_NOT_A_CREDENTIAL.search(n)}
    assert len(rendered) > 20
    assert rendered <= CHART_ENV_CREDENTIALS, sorted(rendered - CHART_ENV_CREDENTIALS)
