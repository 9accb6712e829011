"""Every copy's CSGHub credentials are its own: secrets.sh run for real, held against the real chart.

Two simulated first boots (``csghub_secrets`` from provision/files/firstboot/secrets.sh, run with bash on the build host
as tests/unit/test_firstboot.py does, each on its own copy of the real chart 2.4.0 packed as k3s holds it) must:

- share no credential, and none may be what the chart's clock-derived functions give for any minute of the day
  (``common.randomPassword``, ``csghub.api.token``, ``agenticflow.api.token``, ``csghub.casdoor.client``, recomputed
  here and checked against a real ``helm template`` of the chart);
- reach the chart: values it reads show up in a real helm render in place of the derived ones; objects it ``lookup``s
  (``helm template`` never performs lookups) are pre-created under exactly the name and key the templates read;
- replace Casdoor's fixed signing key pair, its RADIUS secret and the internal API's "signing-key" (the patched
  archive renders this copy's, and refuses to render without them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from appliance.config import ApplianceConfig, deep_merge
from appliance.values import generate_values
from tests.chart import CHART_DIR, objects_of_kind, render_chart

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "provision" / "files" / "firstboot"
TEMPLATES = CHART_DIR / "templates"
RELEASE = NAMESPACE = "csghub"


def _bash(snippet: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **env}
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; . {FILES / 'lib.sh'}; . {FILES / 'secrets.sh'}; {snippet}"],
        capture_output=True, text=True, env=full, check=False, timeout=300,
    )


@dataclass
class Copy:
    state: Path
    manifests: Path
    chart: Path  # the archive as k3s's static dir holds it, patched by first boot
    output: str

    @property
    def secrets_dir(self) -> Path:
        return self.state / "secrets"

    def env(self) -> dict[str, str]:
        return {"CSGHUB_STATE": str(self.state), "K3S_MANIFESTS": str(self.manifests),
                "K3S_STATIC_CHARTS": str(self.chart.parent), "CSGHUB_NAMESPACE": NAMESPACE,
                "CSGHUB_HELMCHART_NAME": RELEASE, "CSGHUB_HELMCHART_NAMESPACE": "kube-system"}

    def secrets(self) -> dict[str, str]:
        out = {}
        for line in (self.secrets_dir / "secrets.env").read_text().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.partition("=")
                out[name] = value
        return out

    def objects(self) -> dict[tuple[str, str], dict[str, Any]]:
        docs = yaml.safe_load_all((self.secrets_dir / "precreated.yaml").read_text())
        return {(d["kind"], d["metadata"]["name"]): d for d in docs if d}

    def values(self) -> dict[str, Any]:
        loaded = yaml.safe_load((self.secrets_dir / "helm-values.yaml").read_text())
        assert isinstance(loaded, dict)
        return loaded


def _chart_archive(dest: Path) -> Path:
    if not (CHART_DIR / "Chart.yaml").is_file():
        pytest.skip(f"the CSGHub chart is not at {CHART_DIR} (the shared reference data sits next to the clone)")
    dest.mkdir(parents=True)
    archive = dest / "csghub-2.4.0.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(CHART_DIR, arcname="csghub")
    return archive


def _first_boot(work: Path) -> Copy:
    copy = Copy(work / "state", work / "manifests", _chart_archive(work / "static" / "charts"), "")
    proc = _bash("csghub_secrets", copy.env())
    assert proc.returncode == 0, proc.stderr
    copy.output = proc.stdout
    return copy


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Copy, Copy]:
    if shutil.which("openssl") is None or shutil.which("perl") is None:
        pytest.skip("openssl and perl are needed (both are in every Debian guest)")
    base = tmp_path_factory.mktemp("copies")
    return _first_boot(base / "a"), _first_boot(base / "b")


# -- the chart's own derivations, recomputed -------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()  # the chart's own choice, recomputed


def chart_random_password(name: str, minute: str) -> str:
    """``common.randomPassword`` (charts/common/templates/_random.tpl) for a service name and "200601021504" minute."""
    bases = [base64.b64encode(_sha256(f"{name}-{minute}-{s}").encode()).decode().replace("=", "") for s in "abc"]
    chars = "".join(bases)
    return "".join(chars[(i * 13 + len(minute)) % len(chars)] for i in range(32))


def chart_api_token(minute: str) -> str:
    """``csghub.api.token`` (templates/csghub/_csghub.tpl)."""
    return _sha256(f"{NAMESPACE}-{minute}") + _sha256(f"{RELEASE}-{minute}")


def chart_agenticflow_token(minute: str) -> str:
    """``agenticflow.api.token`` (charts/agentichub/templates/_agentichub.tpl)."""
    digest = _sha256(_sha1(f"{NAMESPACE}-{minute}") + _sha1(f"{RELEASE}-{minute}"))
    return base64.b64encode(digest[:32].encode()).decode()


def chart_casdoor_client(app: str, hour: str) -> tuple[str, str]:
    """``csghub.casdoor.client`` (templates/casdoor/_casdoor.tpl): id and secret from the install hour."""
    return _sha256(f"{app}-clientId-{hour}")[:20], _sha256(f"{app}-clientSecret-{hour}")[:40]


# Every service name the chart feeds to common.randomPassword (grep of the chart's templates).
RANDOM_PASSWORD_NAMES = ("csghub", "casdoor", "minio", "nats", "gitaly", "registry", "redis", "root")


def chart_derived_values(day: datetime) -> set[str]:
    """Everything the chart's clock-derived functions give on ``day`` (UTC), plain and base64-encoded."""
    out: set[str] = set()
    start = day.replace(hour=0, minute=0, second=0, microsecond=0)
    for m in range(24 * 60):
        minute = (start + timedelta(minutes=m)).strftime("%Y%m%d%H%M")
        for name in RANDOM_PASSWORD_NAMES:
            out.add(chart_random_password(name, minute))
        out.add(chart_api_token(minute))
        out.add(chart_agenticflow_token(minute))
    for h in range(24):
        hour = (start + timedelta(hours=h)).strftime("%Y%m%d%H")
        for app in ("CSGHub", "Admin", "CSGShip"):
            out.update(chart_casdoor_client(app, hour))
    return out | {base64.b64encode(v.encode()).decode() for v in out}


def test_recomputed_derivations_match_a_real_render(helm_bin: Path,
                                                    make_cfg: Callable[..., ApplianceConfig]) -> None:
    """The recomputation is what the chart does: a real render right now holds the values for this minute."""
    values = generate_values(make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192"))
    before = datetime.now(UTC)
    objects = render_chart(helm_bin, values)
    after = datetime.now(UTC)
    minutes = {t.strftime("%Y%m%d%H%M") for t in (before, after)}
    hours = {t.strftime("%Y%m%d%H") for t in (before, after)}
    secrets = {o["metadata"]["name"]: o["data"] for o in objects_of_kind(objects, "Secret")}
    core = next(o["data"] for o in objects_of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "csghub-core")

    def decode(value: str) -> str:
        return base64.b64decode(value).decode()

    assert decode(secrets["csghub-postgresql"]["POSTGRES_PASSWORD"]) in {
        chart_random_password("csghub", m) for m in minutes}
    assert decode(secrets["csghub-minio"]["MINIO_ROOT_PASSWORD"]) in {
        chart_random_password("minio", m) for m in minutes}
    assert decode(secrets["csghub-casdoor-init"]["INIT_ADMIN_PASSWORD"]) in {
        chart_random_password("casdoor", m) for m in minutes}
    assert core["STARHUB_SERVER_API_TOKEN"] in {chart_api_token(m) for m in minutes}
    assert core["OPENCSG_AGENT_AGENTHUB_SERVICE_TOKEN"] in {chart_agenticflow_token(m) for m in minutes}
    assert core["STARHUB_SERVER_CASDOOR_CLIENT_ID"] in {chart_casdoor_client("CSGHub", h)[0] for h in hours}
    assert decode(secrets["csghub-casdoor-init"]["CASDOOR_ADMIN_CLIENT_SECRET"]) in {
        chart_casdoor_client("Admin", h)[1] for h in hours}


# -- two copies ------------------------------------------------------------------------------------------------------


def test_first_boot_reports_and_is_idempotent(copies: tuple[Copy, Copy]) -> None:
    a, _ = copies
    assert "changed: made 21 credential(s) for this copy" in a.output
    assert "changed: new Casdoor signing key and certificate 'csghub-cert'" in a.output
    assert "now reads this copy's Casdoor certificates and internal API secret" in a.output
    before = {p.name: p.read_bytes() for p in a.secrets_dir.iterdir()}
    chart = a.chart.read_bytes()
    again = _bash("csghub_secrets", a.env())
    assert again.returncode == 0, again.stderr
    assert "changed:" not in again.stdout
    assert {p.name: p.read_bytes() for p in a.secrets_dir.iterdir()} == before
    assert a.chart.read_bytes() == chart  # the patched archive is recognised, not patched twice


def test_secret_files_are_root_only(copies: tuple[Copy, Copy]) -> None:
    for copy in copies:
        assert oct(copy.secrets_dir.stat().st_mode & 0o777) == "0o700"
        files = [*copy.secrets_dir.iterdir()]
        assert len(files) == 7  # secrets.env, helm-values.yaml, precreated.yaml, two key pairs
        # Nothing of this copy's goes to k3s's auto-deploy folder (re-applied at every k3s start).
        assert not copy.manifests.exists() or not any(copy.manifests.iterdir())
        for path in files:
            assert oct(path.stat().st_mode & 0o777) == "0o600", path


def test_copies_share_no_secret(copies: tuple[Copy, Copy]) -> None:
    a, b = (c.secrets() for c in copies)
    assert sorted(a) == sorted(b) and len(a) == 21
    for name in a:
        assert a[name] and b[name] and a[name] != b[name], name
    # Within a copy, no two credentials are the same value either.
    assert len(set(a.values())) == len(a)
    for name in ("casdoor-csghub.key", "casdoor-csghub.crt", "casdoor-csgship.key", "casdoor-csgship.crt"):
        assert (copies[0].secrets_dir / name).read_bytes() != (copies[1].secrets_dir / name).read_bytes()


def test_no_secret_is_what_the_chart_would_derive_today(copies: tuple[Copy, Copy]) -> None:
    derived = chart_derived_values(datetime.now(UTC))
    assert len(derived) > 24 * 60 * len(RANDOM_PASSWORD_NAMES)
    for copy in copies:
        for name, value in copy.secrets().items():
            assert value not in derived, name
        for obj in copy.objects().values():
            for key, value in (obj.get("data") or {}).items():
                assert value not in derived, (obj["metadata"]["name"], key)


def test_secrets_are_strong_and_fit_their_consumers(copies: tuple[Copy, Copy]) -> None:
    s = copies[0].secrets()
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "NATS_PASSWORD", "REGISTRY_PASSWORD", "GITALY_TOKEN",
                 "REDIS_PASSWORD", "CASDOOR_RADIUS_SECRET", "GITALY_JWT_SECRET"):
        assert re.fullmatch(r"[A-Za-z0-9]{32}", s[name]), name  # ~190 bits; safe inside connection URLs
    assert re.fullmatch(r"[A-Za-z0-9]{24}", s["CSGHUB_ADMIN_PASSWORD"])  # ~142 bits
    assert re.fullmatch(r"[0-9a-f]{64}", s["HUB_API_TOKEN"])
    for name in ("JWT_SIGNING_KEY", "SPACE_SESSION_SECRET_KEY", "CASDOOR_CSGHUB_CLIENT_SECRET",
                 "CASDOOR_ADMIN_CLIENT_SECRET", "CASDOOR_CSGSHIP_CLIENT_SECRET"):
        assert re.fullmatch(r"[0-9a-f]{40}", s[name]), name  # 160 bits
    for name in ("CASDOOR_CSGHUB_CLIENT_ID", "CASDOOR_ADMIN_CLIENT_ID", "CASDOOR_CSGSHIP_CLIENT_ID"):
        assert re.fullmatch(r"[0-9a-f]{32}", s[name]), name
    assert re.fullmatch(r"[0-9a-f]{32}", base64.b64decode(s["AGENTICFLOW_TOKEN"]).decode())
    # The registry's htpasswd entry is a bcrypt hash of its password (checked by an independent bcrypt).
    assert bcrypt.checkpw(s["REGISTRY_PASSWORD"].encode(), s["REGISTRY_HTPASSWD"].encode())
    assert bcrypt.checkpw(s["CSGHUB_ADMIN_PASSWORD"].encode(), s["CSGHUB_ADMIN_HTPASSWD"].encode())
    assert not bcrypt.checkpw(copies[1].secrets()["REGISTRY_PASSWORD"].encode(), s["REGISTRY_HTPASSWD"].encode())


def _openssl(*args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=True, timeout=60).stdout.decode()


def _chart_fixed_pem(kind: str) -> list[str]:
    """The certificates ("CERTIFICATE") or keys ("RSA PRIVATE KEY") written into the chart's casdoor templates."""
    text = (TEMPLATES / "casdoor" / "configmap.yaml").read_text()
    pattern = rf'"(-----BEGIN {kind}-----\\n.*?-----END {kind}-----\\n)"'
    return [json.loads(f'"{m}"') for m in re.findall(pattern, text)]


def test_casdoor_keys_are_new_and_match_their_certificates(copies: tuple[Copy, Copy]) -> None:
    fixed_certs = _chart_fixed_pem("CERTIFICATE")
    assert len(fixed_certs) == 2  # csghub-cert and csgship-cert
    fixed_moduli = {_openssl("x509", "-noout", "-modulus", stdin=c.encode()) for c in fixed_certs}
    seen = set()
    for copy in copies:
        for name in ("csghub", "csgship"):
            crt = (copy.secrets_dir / f"casdoor-{name}.crt").read_bytes()
            key = (copy.secrets_dir / f"casdoor-{name}.key").read_bytes()
            assert key.startswith(b"-----BEGIN RSA PRIVATE KEY-----")  # PKCS#1, as the chart's own
            modulus = _openssl("x509", "-noout", "-modulus", stdin=crt)
            assert modulus == _openssl("rsa", "-noout", "-modulus", stdin=key)
            assert "RSA Public-Key: (3072 bit)" in _openssl("x509", "-noout", "-text", stdin=crt) or \
                "Public-Key: (3072 bit)" in _openssl("x509", "-noout", "-text", stdin=crt)
            assert modulus not in fixed_moduli
            seen.add(modulus)
    assert len(seen) == 4


# -- what the chart reads as values: a real helm render of the patched archive -----------------------------------------


def _instance_values(copy: Copy, domain: str = "csghub.localhost") -> dict[str, Any]:
    """The valuesContent of the HelmChartConfig first boot writes (lib.sh's instance_manifest, with secrets)."""
    proc = _bash(f"instance_manifest {domain}", copy.env())
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(proc.stdout)
    values = yaml.safe_load(doc["spec"]["valuesContent"])
    assert isinstance(values, dict)
    return values


def _patched_chart_dir(copy: Copy, dest: Path) -> Path:
    with tarfile.open(copy.chart) as tar:
        tar.extractall(dest, filter="data")
    return dest / "csghub"


@pytest.fixture(scope="module")
def rendered(copies: tuple[Copy, Copy], helm_bin: Path, tmp_path_factory: pytest.TempPathFactory,
             make_cfg: Callable[..., ApplianceConfig]) -> list[dict[str, Any]]:
    """Copy A's release as helm-controller renders it: build values, then this copy's HelmChartConfig over them."""
    chart = _patched_chart_dir(copies[0], tmp_path_factory.mktemp("patched"))
    build = generate_values(make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192"))
    return render_chart(helm_bin, deep_merge(build, _instance_values(copies[0])), chart=chart)


def _by_name(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects_of_kind(objects, kind)}


def test_instance_values_carry_the_domain_and_the_secrets(copies: tuple[Copy, Copy]) -> None:
    values = _instance_values(copies[0], "csghub.192.168.56.10.nip.io")
    assert values["global"]["gateway"]["external"]["domain"] == "csghub.192.168.56.10.nip.io"
    assert values["casdoor"]["admin"]["password"] == copies[0].secrets()["CSGHUB_ADMIN_PASSWORD"]


def test_render_takes_our_values(copies: tuple[Copy, Copy], rendered: list[dict[str, Any]]) -> None:
    s = copies[0].secrets()
    init = _by_name(rendered, "Secret")["csghub-casdoor-init"]["data"]
    assert base64.b64decode(init["INIT_ADMIN_PASSWORD"]).decode() == s["CSGHUB_ADMIN_PASSWORD"]
    assert bcrypt.checkpw(s["CSGHUB_ADMIN_PASSWORD"].encode(), base64.b64decode(init["INIT_ADMIN_HTPASSWD"]))
    casdoor = _by_name(rendered, "ConfigMap")["csghub-casdoor"]["data"]
    root = next(u for u in json.loads(casdoor["init_data.json"])["users"] if u["name"] == "root")
    assert bcrypt.checkpw(s["CSGHUB_ADMIN_PASSWORD"].encode(), root["password"].encode())
    core = _by_name(rendered, "ConfigMap")["csghub-core"]["data"]
    assert core["OPENCSG_AGENT_AGENTHUB_SERVICE_TOKEN"] == s["AGENTICFLOW_TOKEN"]
    assert core["STARHUB_SERVER_XNET_API_KEY"] == s["HUB_API_TOKEN"]


def test_render_signs_with_this_copys_casdoor_key(copies: tuple[Copy, Copy], rendered: list[dict[str, Any]]) -> None:
    d = copies[0].secrets_dir
    certs = _by_name(rendered, "Secret")["csghub-casdoor-certs"]["data"]
    assert base64.b64decode(certs["tls.crt"]) == (d / "casdoor-csghub.crt").read_bytes()
    assert base64.b64decode(certs["tls.key"]) == (d / "casdoor-csghub.key").read_bytes()
    init_data = json.loads(_by_name(rendered, "ConfigMap")["csghub-casdoor"]["data"]["init_data.json"])
    by_name = {c["name"]: c for c in init_data["certs"]}
    for name in ("csghub", "csgship"):
        assert by_name[f"{name}-cert"]["certificate"] == (d / f"casdoor-{name}.crt").read_text()
        assert by_name[f"{name}-cert"]["privateKey"] == (d / f"casdoor-{name}.key").read_text()
        assert by_name[f"{name}-cert"]["bitSize"] == 3072
    text = yaml.safe_dump_all(rendered)
    for fixed in _chart_fixed_pem("CERTIFICATE") + _chart_fixed_pem("RSA PRIVATE KEY"):
        body = fixed.splitlines()[1]
        assert body not in text  # neither the PEM nor its base64 form...
        assert base64.b64encode(fixed.encode()).decode()[:60] not in text


def internal_api_secrets(objects: list[dict[str, Any]]) -> dict[str, str]:
    """Where the key of csghub-server's internal API is (chart 2.4.0): Gitaly's and gitlab-shell's configuration
    (the HS256 key of the JWTs they send) and the server's environment (the key it checks them with)."""
    config_maps = _by_name(objects, "ConfigMap")
    gitaly = tomllib.loads(config_maps["csghub-gitaly"]["data"]["config.toml"])["gitlab"]
    shell = yaml.safe_load(config_maps["csghub-gitlab-shell"]["data"]["config.yml"])
    server = _by_name(objects, "Deployment")["csghub-server"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in server.get("env") or []}
    return {"gitaly [gitlab] secret": gitaly.get("secret", ""),
            "gitlab-shell secret": shell.get("secret", ""),
            "server STARHUB_SERVER_GITALY_JWT_SECRET": env.get("STARHUB_SERVER_GITALY_JWT_SECRET", "")}


def test_render_takes_this_copys_radius_and_internal_api_secrets(copies: tuple[Copy, Copy],
                                                                 rendered: list[dict[str, Any]]) -> None:
    app_conf = _by_name(rendered, "ConfigMap")["csghub-casdoor"]["data"]["app.conf"]
    assert f'radiusSecret = "{copies[0].secrets()["CASDOOR_RADIUS_SECRET"]}"' in app_conf
    assert 'radiusSecret = "secret"' not in app_conf
    # Gitaly and gitlab-shell sign with the copy's key, and csghub-server checks with the same one (its default,
    # when the variable is unset, is the chart's "signing-key": csghub-server v2.4.0 common/config/config.go).
    jwt = copies[0].secrets()["GITALY_JWT_SECRET"]
    assert internal_api_secrets(rendered) == dict.fromkeys(internal_api_secrets(rendered), jwt)
    assert "signing-key" not in yaml.safe_dump_all(rendered)


def test_patched_chart_refuses_to_render_without_a_key(copies: tuple[Copy, Copy], helm_bin: Path,
                                                       tmp_path: Path,
                                                       make_cfg: Callable[..., ApplianceConfig]) -> None:
    chart = _patched_chart_dir(copies[0], tmp_path)
    build = generate_values(make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192"))
    # Each value the patch reads, left out alone: the release does not render (rather than use the chart's text).
    without_certs = _instance_values(copies[0])
    del without_certs["casdoor"]["applianceCerts"]
    with pytest.raises(RuntimeError, match=r"casdoor\.applianceCerts\.csghub\.\w+ is missing"):
        render_chart(helm_bin, deep_merge(build, without_certs), chart=chart)
    without_jwt = _instance_values(copies[0])
    del without_jwt["gitaly"]["applianceJwtSecret"]
    with pytest.raises(RuntimeError, match=r"gitaly\.applianceJwtSecret is missing"):
        render_chart(helm_bin, deep_merge(build, without_jwt), chart=chart)


@pytest.mark.parametrize(("template", "text", "message"), [
    ("casdoor/secret.yaml", "data:\n  tls.crt: {{ .Values.x }}\n",
     "expected the fixed tls.crt/tls.key in templates/casdoor/secret.yaml, found 0 of 2"),
    ("gitaly/configmap.yaml", "data:\n  config.toml: |\n    [gitlab]\n    secret_file = \"/x\"\n",
     "expected one fixed 'secret = \"signing-key\"' in templates/gitaly/configmap.yaml, found 0"),
    ("gitlab-shell/configmap.yaml", "secret: \"signing-key\"\nx:\n  secret: \"signing-key\"\n",
     "expected one fixed 'secret: \"signing-key\"' in templates/gitlab-shell/configmap.yaml, found 2"),
])
def test_chart_patch_refuses_an_unknown_chart(tmp_path: Path, template: str, text: str, message: str) -> None:
    """A chart whose patched templates changed is reported, and the archive left as it was, not half-patched."""
    src = tmp_path / "csghub"
    for part in ("casdoor", "gitaly", "gitlab-shell"):
        shutil.copytree(CHART_DIR / "templates" / part, src / "templates" / part)
    (src / "templates" / template).write_text(text)
    archive = tmp_path / "static" / "csghub-9.9.9.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="csghub")
    before = archive.read_bytes()
    proc = _bash(f"patch_chart_casdoor_certs {archive}", {})
    assert proc.returncode == 1
    assert message in proc.stderr
    assert archive.read_bytes() == before
    assert sorted(p.name for p in archive.parent.iterdir()) == ["csghub-9.9.9.tgz"]  # no leftover


# -- what the chart looks up: pre-created under the name and key its templates read ------------------------------------

# (template, kind, name the template looks up, key it reads) for every credential the chart would otherwise derive.
# Names: the templates look up `common.names.custom` of the service ("<release>-<service>") or a literal suffix of it.
LOOKUPS = [
    ("templates/postgresql/secret.yaml", "Secret", "csghub-postgresql", "POSTGRES_PASSWORD"),
    ("charts/common/templates/_postgres.tpl", "Secret", "csghub-postgresql", "POSTGRES_PASSWORD"),
    ("templates/minio/secret.yaml", "Secret", "csghub-minio", "MINIO_ROOT_PASSWORD"),
    ("charts/common/templates/_objectStore.tpl", "Secret", "csghub-minio", "MINIO_ROOT_PASSWORD"),
    ("templates/nats/secret.yaml", "Secret", "csghub-nats", "NATS_PASSWORD"),
    ("charts/common/templates/_nats.tpl", "Secret", "csghub-nats", "NATS_PASSWORD"),
    ("templates/registry/secret.yaml", "Secret", "csghub-registry", "REGISTRY_PASSWORD"),
    ("templates/registry/secret.yaml", "Secret", "csghub-registry", "htpasswd"),
    ("charts/common/templates/_registry.tpl", "Secret", "csghub-registry", "REGISTRY_PASSWORD"),
    ("templates/gitaly/secret.yaml", "Secret", "csghub-gitaly", "GITALY_TOKEN"),
    ("charts/common/templates/_gitaly.tpl", "Secret", "csghub-gitaly", "GITALY_TOKEN"),
    ("templates/redis/secret.yaml", "Secret", "csghub-redis", "REDIS_PASSWD"),
    ("charts/common/templates/_redis.tpl", "Secret", "csghub-redis", "REDIS_PASSWD"),
    ("templates/casdoor/secret.yaml", "Secret", "csghub-casdoor-init", "INIT_ADMIN_PASSWORD"),
    ("templates/NOTES.txt", "Secret", "csghub-casdoor-init", "INIT_ADMIN_PASSWORD"),
    ("templates/casdoor/secret.yaml", "Secret", "csghub-casdoor-init", "INIT_ADMIN_HTPASSWD"),
    ("templates/casdoor/secret.yaml", "Secret", "csghub-casdoor-init", "CASDOOR_ADMIN_CLIENT_ID"),
    ("templates/casdoor/secret.yaml", "Secret", "csghub-casdoor-init", "CASDOOR_ADMIN_CLIENT_SECRET"),
    ("templates/temporal/configmap.yaml", "Secret", "csghub-casdoor-init", "CASDOOR_ADMIN_CLIENT_SECRET"),
    ("templates/csghub/configmap.yaml", "ConfigMap", "csghub-core", "CSGHUB_PORTAL_STARHUB_API_KEY"),
    ("templates/csghub/configmap.yaml", "ConfigMap", "csghub-core", "STARHUB_JWT_SIGNING_KEY"),
    ("templates/csghub/configmap.yaml", "ConfigMap", "csghub-core", "STARHUB_SERVER_SPACE_SESSION_SECRET_KEY"),
    ("templates/csghub/configmap.yaml", "ConfigMap", "csghub-core", "STARHUB_SERVER_CASDOOR_CLIENT_ID"),
    ("templates/csghub/configmap.yaml", "ConfigMap", "csghub-core", "STARHUB_SERVER_CASDOOR_CLIENT_SECRET"),
    ("charts/agentichub/templates/agenticflow/configmap.yaml", "ConfigMap", "csghub-core",
     "CSGHUB_PORTAL_STARHUB_API_KEY"),
    ("templates/xnet/configmap.yaml", "ConfigMap", "csghub-xnet", "STARHUB_SERVER_API_TOKEN"),
    ("templates/xnet/configmap.yaml", "ConfigMap", "csghub-xnet", "STARHUB_JWT_SIGNING_KEY"),
    ("charts/runner/templates/configmap.yaml", "ConfigMap", "csghub-runner", "STARHUB_SERVER_API_TOKEN"),
    ("charts/agentichub/templates/agenticflow/configmap.yaml", "ConfigMap", "csghub-agenticflow",
     "FLOWS_ACCESS_TOKEN"),
    ("templates/casdoor/configmap.yaml", "ConfigMap", "csghub-casdoor", "init_data.json"),
]

# What each pre-created key must hold, from secrets.env (None: checked separately).
EXPECTED = {
    ("csghub-postgresql", "POSTGRES_PASSWORD"): "POSTGRES_PASSWORD",
    ("csghub-minio", "MINIO_ROOT_PASSWORD"): "MINIO_ROOT_PASSWORD",
    ("csghub-nats", "NATS_PASSWORD"): "NATS_PASSWORD",
    ("csghub-registry", "REGISTRY_PASSWORD"): "REGISTRY_PASSWORD",
    ("csghub-gitaly", "GITALY_TOKEN"): "GITALY_TOKEN",
    ("csghub-redis", "REDIS_PASSWD"): "REDIS_PASSWORD",
    ("csghub-casdoor-init", "INIT_ADMIN_PASSWORD"): "CSGHUB_ADMIN_PASSWORD",
    ("csghub-casdoor-init", "INIT_ADMIN_HTPASSWD"): "CSGHUB_ADMIN_HTPASSWD",
    ("csghub-casdoor-init", "CASDOOR_ADMIN_CLIENT_ID"): "CASDOOR_ADMIN_CLIENT_ID",
    ("csghub-casdoor-init", "CASDOOR_ADMIN_CLIENT_SECRET"): "CASDOOR_ADMIN_CLIENT_SECRET",
    ("csghub-core", "CSGHUB_PORTAL_STARHUB_API_KEY"): "HUB_API_TOKEN",
    ("csghub-core", "STARHUB_JWT_SIGNING_KEY"): "JWT_SIGNING_KEY",
    ("csghub-core", "STARHUB_SERVER_SPACE_SESSION_SECRET_KEY"): "SPACE_SESSION_SECRET_KEY",
    ("csghub-core", "STARHUB_SERVER_CASDOOR_CLIENT_ID"): "CASDOOR_CSGHUB_CLIENT_ID",
    ("csghub-core", "STARHUB_SERVER_CASDOOR_CLIENT_SECRET"): "CASDOOR_CSGHUB_CLIENT_SECRET",
    ("csghub-xnet", "STARHUB_SERVER_API_TOKEN"): "HUB_API_TOKEN",
    ("csghub-xnet", "STARHUB_JWT_SIGNING_KEY"): "JWT_SIGNING_KEY",
    ("csghub-runner", "STARHUB_SERVER_API_TOKEN"): "HUB_API_TOKEN",
    ("csghub-agenticflow", "FLOWS_ACCESS_TOKEN"): "AGENTICFLOW_TOKEN",
}


# Looked up by the chart but rendered only with settings the build leaves off (these copies are community edition).
NOT_PRECREATED = {
    "csghub-redis": "the Secret renders only with redis.requirePass, which the build leaves off",
    "csghub-agenticflow": "AgenticHub's flows are enterprise-only",
}


@pytest.mark.parametrize(("template", "kind", "name", "key"), LOOKUPS,
                         ids=[f"{t.rsplit('/', 2)[-2]}/{n}/{k}" for t, _, n, k in LOOKUPS])
def test_template_looks_up_what_first_boot_precreates(copies: tuple[Copy, Copy], template: str, kind: str,
                                                      name: str, key: str) -> None:
    text = (CHART_DIR / template).read_text()
    assert re.search(rf'lookup "v1" "{kind}"', text), f"{template} no longer looks up a {kind}"
    assert f'"{key}"' in text or f".{key} " in text or f"\"{key}\"" in text, f"{template} no longer reads {key}"
    suffix = name.removeprefix(f"{RELEASE}-")
    # The name is the service's (common.names.custom -> "<release>-<service>"), or "<that>-init" for casdoor-init.
    assert (f'"{suffix}"' in text or suffix.replace("-", "") in text.lower() or
            ("casdoor" in suffix and '"%s-init"' in text)), f"{template} does not name {name}"
    if name in NOT_PRECREATED:
        # Not rendered by the chart with the build's values: pre-creating it would leave a Helm-labelled orphan.
        assert (kind, name) not in copies[0].objects(), NOT_PRECREATED[name]
        return
    obj = copies[0].objects()[(kind, name)]
    data = obj["data"]
    assert key in data
    meta = obj["metadata"]
    # Helm adopts it on install (and keeps it on upgrade) only with these.
    assert meta["namespace"] == NAMESPACE
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "Helm"}
    assert meta["annotations"] == {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE}
    secrets = copies[0].secrets()
    if (name, key) in EXPECTED:
        held = base64.b64decode(data[key]).decode() if kind == "Secret" else data[key]
        assert held == secrets[EXPECTED[(name, key)]]
    elif key == "htpasswd":
        assert base64.b64decode(data[key]).decode() == f"registry:{secrets['REGISTRY_HTPASSWD']}"
    elif key == "init_data.json":
        apps = {a["name"]: a for a in json.loads(data[key])["applications"]}
        for app, var in (("CSGHub", "CSGHUB"), ("Admin", "ADMIN"), ("CSGShip", "CSGSHIP")):
            assert apps[app]["clientId"] == secrets[f"CASDOOR_{var}_CLIENT_ID"]
            assert apps[app]["clientSecret"] == secrets[f"CASDOOR_{var}_CLIENT_SECRET"]


def test_looked_up_names_are_the_chart_objects(helm_bin: Path, make_cfg: Callable[..., ApplianceConfig]) -> None:
    """Every pre-created object is one the chart itself renders (so Helm adopts it), with Redis's password and the
    enterprise-only agenticflow turned on so that those render too."""
    values = generate_values(make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192", "csghub.edition=ee"))
    values = deep_merge(values, {"redis": {"requirePass": True}})
    objects = render_chart(helm_bin, values)
    rendered = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objects}
    for _, kind, name, _ in LOOKUPS:
        assert (kind, name, NAMESPACE) in rendered, (kind, name)


def test_namespace_comes_first_in_the_manifest(copies: tuple[Copy, Copy]) -> None:
    """kubectl creates the objects in file order (ensure_release): the namespace must exist first."""
    docs = [d for d in yaml.safe_load_all((copies[0].secrets_dir / "precreated.yaml").read_text()) if d]
    assert docs[0] == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}


def test_enterprise_copies_precreate_agenticflow(copies: tuple[Copy, Copy]) -> None:
    proc = _bash("load_secrets; secrets_manifest", {**copies[0].env(), "CSGHUB_EDITION": "ee"})
    assert proc.returncode == 0, proc.stderr
    names = {d["metadata"]["name"] for d in yaml.safe_load_all(proc.stdout) if d}
    assert "csghub-agenticflow" in names and "csghub-redis" not in names


def test_first_boot_takes_an_old_secrets_manifest_out_of_the_auto_deploy_folder(copies: tuple[Copy, Copy],
                                                                               tmp_path: Path) -> None:
    copy = copies[0]
    old = tmp_path / "manifests" / "csghub-appliance-secrets.yaml"
    old.parent.mkdir()
    old.write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: csghub\n")
    proc = _bash("csghub_secrets", {**copy.env(), "K3S_MANIFESTS": str(old.parent)})
    assert proc.returncode == 0, proc.stderr
    assert not old.exists() and "removed" in proc.stdout


def test_reconfigure_keeps_the_credentials_in_the_values(copies: tuple[Copy, Copy], tmp_path: Path) -> None:
    """csghub-reconfigure rewrites the HelmChartConfig for a new domain (helm-controller then upgrades the release):
    this copy's values go with it, unchanged, and the looked-up objects stay as they are."""
    copy = copies[0]
    env = {**copy.env(), "K3S_MANIFESTS": str(tmp_path), "CSGHUB_DOMAIN": "csghub.localhost",
           "CSGHUB_STATE": str(copy.state)}
    fake = "stack_installed() { true; }; systemctl() { return 3; };"
    secrets_manifest = (copy.secrets_dir / "precreated.yaml").read_bytes()
    for domain_args, domain in (("nat 10.0.2.15", "csghub.localhost"),
                                ("address 192.168.56.10", "csghub.192.168.56.10.nip.io")):
        proc = _bash(f"{fake} apply_access {domain_args}", env)
        assert proc.returncode == 0, proc.stderr
        doc = yaml.safe_load((tmp_path / "csghub-appliance-instance.yaml").read_text())
        values = yaml.safe_load(doc["spec"]["valuesContent"])
        assert values["global"]["gateway"]["external"]["domain"] == domain
        assert values["casdoor"] == copy.values()["casdoor"] and values["server"] == copy.values()["server"]
        assert oct((tmp_path / "csghub-appliance-instance.yaml").stat().st_mode & 0o777) == "0o600"
    assert (copy.secrets_dir / "precreated.yaml").read_bytes() == secrets_manifest
    (copy.state / "access.env").unlink()
