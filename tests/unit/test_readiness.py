"""The readiness gate (provision/files/common/readiness.sh), registries.yaml, a reconfigure that keeps the release.

The gate's decisions are pure bash functions: canned facts in, one status line out, and each failure must give the
right line. The names the gate relies on (Jobs, Secrets and their keys, Casdoor's organization and application, the
registry route and its auth, the git SSH listener) are checked against the real chart 2.4.0 rendered by a real helm.
The probes run against real components where they run here (OpenSSH for the git banner, curl against a loopback HTTP
server for the gateway). csghub-reconfigure runs for real in a private mount namespace against the k3s stand-in
(tests/data/fake_k3s.py), whose helm-controller rejects an upgrade while a finished Job of the release still exists,
as Kubernetes does (a Job's pod template is immutable).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import PROJECT_ROOT, guest_environment, load_config
from appliance.manifests import manifest_yaml, render_manifests
from appliance.values import generate_values
from tests.chart import objects_of_kind, render_chart
from tests.unit.test_manifests_scripts import ADMIN, gateway, git_sshd  # noqa: F401  (fixtures)

READINESS = PROJECT_ROOT / "provision" / "files" / "common" / "readiness.sh"
FIRSTBOOT = PROJECT_ROOT / "provision" / "files" / "firstboot"
FAKE_K3S = PROJECT_ROOT / "tests" / "data" / "fake_k3s.py"
FAKE_HOST = PROJECT_ROOT / "tests" / "data" / "fake_k3s_host.py"


def bash(snippet: str, stdin: str = "", env: dict[str, str] | None = None, check: bool = True,
         ) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **(env or {})}
    return subprocess.run(["bash", "-c", f"set -euo pipefail; . {shlex.quote(str(READINESS))}; {snippet}"],
                          input=stdin, capture_output=True, text=True, env=full_env, check=check, timeout=60)


def verdict(*facts: str) -> str:
    return bash("gate_verdict", "".join(f"{f}\n" for f in facts)).stdout.strip()


def gate_constant(name: str) -> str:
    return bash(f"echo \"${name}\"").stdout.strip()


# -- the decisions ------------------------------------------------------------------------------

UP = ["api up", "release deployed", "job csghub/csghub-server-migrate complete",
      "job csghub/csghub-casdoor-migrate complete", "job csghub/csghub-minio-init complete",
      "workload Deployment csghub/csghub-portal ready", "workload StatefulSet csghub/csghub-postgresql ready"]
ENDPOINTS = ["portal 200", "login ok", "gitssh SSH-2.0-OpenSSH_9.2", "registry 401 Basic"]
RETRY = "; then sudo csghub-status --retry"


def test_everything_answering_is_ready() -> None:
    assert verdict(*UP, *ENDPOINTS) == "ready"
    # The registry may also let us in (anonymous access configured).
    assert verdict(*UP, *ENDPOINTS[:3], "registry 200 -") == "ready"


@pytest.mark.parametrize(
    ("facts", "line"),
    [
        (["api down"], "starting (0/1): waiting for the cluster API"),
        (["api up", "release installing"], "starting (1/2): waiting for the Helm release csghub/csghub"),
        ([*UP[:3], "job csghub/csghub-casdoor-migrate running", *UP[4:], *ENDPOINTS],
         "starting (10/11): waiting for job csghub/csghub-casdoor-migrate"),
        ([*UP[:6], "workload StatefulSet csghub/csghub-postgresql waiting", *ENDPOINTS],
         "starting (10/11): waiting for statefulset csghub/csghub-postgresql"),
        ([*UP, "portal 503", *ENDPOINTS[1:]],
         "starting (10/11): waiting for the portal through the gateway (HTTP 503)"),
        ([*UP, "portal 200", "login down", *ENDPOINTS[2:]],
         "starting (10/11): waiting for the admin login through Casdoor"),
        ([*UP, *ENDPOINTS[:2], "gitssh -", ENDPOINTS[3]], "starting (10/11): waiting for git over SSH (no SSH banner)"),
        # An answer without an auth challenge is not CSGHub's registry (or not through the gateway).
        ([*UP, *ENDPOINTS[:3], "registry 404 -"], "starting (10/11): waiting for the registry's /v2/ (HTTP 404)"),
        ([*UP, *ENDPOINTS[:3], "registry 401 Bearer"], "starting (10/11): waiting for the registry's /v2/ (HTTP 401)"),
        # At build time (online) a missing image is being pulled.
        ([*UP, "pull csghub/csghub-server-0 opencsghq/csghub-server:v2.4.0-ce ErrImagePull", *ENDPOINTS],
         "starting (11/11): waiting for pulling image opencsghq/csghub-server:v2.4.0-ce for csghub/csghub-server-0"),
    ],
    ids=["api", "release", "job", "workload", "portal", "login", "gitssh", "registry-404", "registry-bearer", "pull"],
)
def test_pending_checks_say_starting_with_counts(facts: list[str], line: str) -> None:
    assert verdict(*facts) == line


@pytest.mark.parametrize(
    ("facts", "line"),
    [
        (["api up", "release failed job helm-install-csghub failed 5 times"],
         "failed: the Helm release csghub/csghub did not install (job helm-install-csghub failed 5 times) — "
         "sudo k3s kubectl -n kube-system logs job/helm-install-csghub" + RETRY),
        ([*UP[:2], "job csghub/csghub-server-migrate failed", *UP[3:], *ENDPOINTS],
         "failed: job csghub/csghub-server-migrate failed — sudo k3s kubectl -n csghub logs job/csghub-server-migrate"
         + RETRY),
        ([*UP, "portal 200", "login refused password or code is incorrect", *ENDPOINTS[2:]],
         "failed: the admin login through Casdoor was refused (password or code is incorrect) — "
         "sudo k3s kubectl -n csghub logs deploy/csghub-casdoor" + RETRY),
        # Offline (a copy's boot) a missing image never arrives.
        ([*UP, "pull csghub/csghub-server-0 opencsghq/csghub-server:v2.4.0-ce ImagePullBackOff", "offline yes"],
         "failed: image opencsghq/csghub-server:v2.4.0-ce of pod csghub/csghub-server-0 is not in the image store "
         "(ImagePullBackOff) — sudo k3s ctr -n k8s.io images ls | grep opencsghq/csghub-server:v2.4.0-ce "
         "(the image is missing from this image store)" + RETRY),
        # Never "starting" forever: at the deadline the first pending check is the failure.
        ([*UP[:5], "workload StatefulSet csghub/csghub-postgresql waiting", "expired yes"],
         "failed: statefulset csghub/csghub-postgresql not ready in time — "
         "sudo k3s kubectl -n csghub describe statefulset csghub-postgresql" + RETRY),
        ([*UP, *ENDPOINTS[:2], "gitssh -", ENDPOINTS[3], "expired yes"],
         "failed: git over SSH (no SSH banner) not ready in time — "
         "sudo k3s kubectl -n csghub logs deploy/csghub-gitlab-shell" + RETRY),
        (["api down", "expired yes"],
         "failed: the cluster API not ready in time — sudo systemctl status k3s; sudo journalctl -u k3s" + RETRY),
    ],
    ids=["release", "job", "login", "image-offline", "deadline-workload", "deadline-gitssh", "deadline-api"],
)
def test_each_failure_gives_its_line(facts: list[str], line: str) -> None:
    assert verdict(*facts) == line


def test_the_build_names_its_own_retry() -> None:
    out = bash("gate_verdict", "api up\nrelease failed x\n", env={"GATE_RETRY_HINT": "re-run the build"}).stdout
    assert out.strip().endswith("; then re-run the build")


def test_fact_parsers() -> None:
    jobs = bash("job_facts", "csghub/a Complete=True,SuccessCriteriaMet=True,\ncsghub/b \n"
                             "csghub/c FailureTarget=True,Failed=True,\n").stdout.splitlines()
    assert jobs == ["job csghub/a complete", "job csghub/b running", "job csghub/c failed"]
    workloads = bash("workload_facts spaces", "Deployment csghub/portal 1 1\nDeployment csghub/server  \n"
                                              "Deployment spaces/user-app 1 0\nDaemonSet kube-system/x 1 0\n").stdout
    assert workloads.splitlines() == ["workload Deployment csghub/portal ready",
                                      "workload Deployment csghub/server waiting",
                                      "workload DaemonSet kube-system/x waiting"]
    pulls = bash("pull_facts spaces", "csghub/p docker.io/busybox:latest= docker.io/a/b:1=ErrImagePull\n"
                                      "spaces/u x:1=ImagePullBackOff\n"
                                      "csghub/q reg:5000/c@sha256:ab=ErrImageNeverPull\n").stdout
    assert pulls.splitlines() == ["pull csghub/p docker.io/a/b:1 ErrImagePull",
                                  "pull csghub/q reg:5000/c@sha256:ab ErrImageNeverPull"]


def test_casdoor_login_body_is_json_with_the_password_escaped() -> None:
    body = json.loads(bash(f"casdoor_login_body root {shlex.quote(ADMIN[1])}").stdout)
    assert body == {"type": "login", "organization": "OpenCSG", "application": "CSGHub", "username": "root",
                    "password": ADMIN[1], "autoSignin": False}
    assert bash("casdoor_login_body root $'a\\nb'", check=False).returncode != 0


def test_login_outcome() -> None:
    assert bash("login_outcome", '{"status":"ok","msg":"","data":"x"}').stdout.strip() == "ok"
    assert bash("login_outcome", '{"status": "error", "msg": "password or code is incorrect"}').stdout.strip() == (
        "refused password or code is incorrect")
    assert bash("login_outcome", "<html>").stdout.strip() == "refused no answer Casdoor understands"


def test_registries_yaml_and_hosts_line() -> None:
    doc = yaml.safe_load(bash("registries_yaml csghub.localhost:30080 registry 'p\"w\\x'").stdout)
    assert doc == {
        "mirrors": {"csghub.localhost:30080": {"endpoint": ["http://csghub.localhost:30080"]}},
        "configs": {"csghub.localhost:30080": {"auth": {"username": "registry", "password": 'p"w\\x'}}},
    }
    hosts = "127.0.0.1 localhost\n10.254.254.1 old.example # csghub-appliance: in-cluster registry\n::1 ip6\n"
    once = bash("hosts_with_registry 10.254.254.1 csghub.localhost", hosts).stdout
    mark = "# csghub-appliance: in-cluster registry"
    assert once == f"127.0.0.1 localhost\n::1 ip6\n10.254.254.1 csghub.localhost {mark}\n"
    assert bash("hosts_with_registry 10.254.254.1 csghub.localhost", once).stdout == once


def test_sync_registries_writes_once_and_restarts_k3s_only_on_change(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    calls = tmp_path / "calls"
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    env = {"K3S_REGISTRIES": str(tmp_path / "k3s" / "registries.yaml"), "GATE_HOSTS_FILE": str(tmp_path / "hosts"),
           "CSGHUB_HTTP_PORT": "30080", "K3S_NODE_IP": "10.254.254.1"}
    # Stand-ins for the cluster (the Secret) and systemd, recording what is asked of them.
    env["SECRETS"], env["CALLS"] = str(secrets), str(calls)
    stubs = ('_gate_kc() { echo "kubectl $*" >>"$CALLS"; local key v;'
             ' key=$(sed "s/.*data\\.\\(.*\\)}/\\1/" <<<"${*: -1}");'
             ' v=$(sed -n "s/^$key=//p" "$SECRETS" 2>/dev/null); [[ -n $v ]] && printf %s "$v" | base64; return 0; };'
             ' systemctl() { echo "systemctl $*" >>"$CALLS"; };')  # k3s counts as running

    def sync() -> str:
        return bash(f"{stubs} sync_registries csghub.localhost", env=env, check=False).stdout

    assert "not there yet" in sync()  # the release has not made the Secret yet
    assert not (tmp_path / "k3s" / "registries.yaml").exists()
    secrets.write_text("REGISTRY_USERNAME=registry\nREGISTRY_PASSWORD=first\n")
    first = sync()
    assert "changed: " + env["K3S_REGISTRIES"] + " names the registry csghub.localhost:30080" in first
    assert "changed: restarted k3s" in first
    doc = yaml.safe_load((tmp_path / "k3s" / "registries.yaml").read_text())
    assert doc["configs"]["csghub.localhost:30080"]["auth"] == {"username": "registry", "password": "first"}
    assert oct((tmp_path / "k3s" / "registries.yaml").stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "hosts").read_text().endswith(
        "10.254.254.1 csghub.localhost # csghub-appliance: in-cluster registry\n")
    again = sync()
    assert "changed:" not in again and "ok: " + env["K3S_REGISTRIES"] + " already names" in again
    # New credentials (another copy, or a rotated Secret): rewritten, k3s restarted again.
    secrets.write_text("REGISTRY_USERNAME=registry\nREGISTRY_PASSWORD=second\n")
    assert "changed: restarted k3s" in sync()
    assert calls.read_text().count("systemctl restart k3s.service") == 2


# -- the probes against real things ----------------------------------------------------------------


def probe_env(port: int, git_port: int = 1) -> dict[str, str]:
    return {"CSGHUB_HTTP_PORT": str(port), "K3S_NODE_IP": "127.0.0.1", "CSGHUB_GIT_SSH_PORT": str(git_port)}


def test_ssh_banner_probe_reads_a_real_sshd(git_sshd: int) -> None:  # noqa: F811
    assert bash("gate_ssh_banner", env=probe_env(1, git_sshd)).stdout.startswith("SSH-2.0-OpenSSH")
    # Nothing listening: no banner, promptly.
    assert bash("gate_ssh_banner", env=probe_env(1, 1)).stdout.strip() == "-"


def test_http_probes_through_a_loopback_gateway(gateway: int) -> None:  # noqa: F811
    env = probe_env(gateway)
    assert bash("gate_http_code csghub.localhost /", env=env).stdout.strip() == "200"
    assert bash("gate_registry_fact csghub.localhost", env=env).stdout.strip() == "registry 401 Basic"
    secret = {"INIT_ADMIN_USER": ADMIN[0], "INIT_ADMIN_PASSWORD": ADMIN[1]}
    stub = "gate_secret_value() { case $2 in " + " ".join(
        f"{k}) printf %s {shlex.quote(v)};;" for k, v in secret.items()) + " esac; };"
    assert bash(f"{stub} gate_login_fact casdoor.csghub.localhost", env=env).stdout.strip() == "login ok"
    wrong = stub.replace(shlex.quote(ADMIN[1]), "wrong")
    assert bash(f"{wrong} gate_login_fact casdoor.csghub.localhost", env=env).stdout.strip() == (
        "login refused password or code is incorrect")
    # Nothing listening on the port: down, not refused (refusal fails the gate at once).
    assert bash(f"{stub} gate_login_fact casdoor.csghub.localhost", env=probe_env(1)).stdout.strip() == "login down"
    assert bash("gate_http_code csghub.localhost /", env=probe_env(1)).stdout.strip() == "000"


# -- the names the gate relies on, in the real chart -------------------------------------------------


def _render(helm: Path, *sets: str) -> list[dict[str, Any]]:
    cfg = load_config(None, ["provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192", *sets], "libvirt")
    return render_chart(helm, generate_values(cfg))


def _named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects_of_kind(objects, kind) if o["metadata"]["name"] == name)


def test_the_gate_matches_the_real_chart(helm_bin: Path) -> None:
    objects = _render(helm_bin)
    release = gate_constant("GATE_RELEASE")
    # Every Job carries the release's instance label (the gate's and reconfigure's selector) and a TTL.
    jobs = {o["metadata"]["name"]: o for o in objects_of_kind(objects, "Job")}
    assert {"csghub-server-migrate", "csghub-casdoor-migrate", "csghub-minio-init"} <= set(jobs)
    for job in jobs.values():
        assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == release
        assert job["spec"]["ttlSecondsAfterFinished"] > 0
    # Credentials: the Secrets and keys the gate reads.
    casdoor = _named(objects, "Secret", gate_constant("GATE_CASDOOR_SECRET"))
    registry = _named(objects, "Secret", gate_constant("GATE_REGISTRY_SECRET"))
    assert {"INIT_ADMIN_USER", "INIT_ADMIN_PASSWORD"} <= set(casdoor["data"])
    assert {"REGISTRY_USERNAME", "REGISTRY_PASSWORD"} <= set(registry["data"])
    admin = base64.b64decode(casdoor["data"]["INIT_ADMIN_USER"]).decode()
    # Casdoor's seed: the organization and application /api/login names, password login on, the admin in it.
    seed = json.loads(_named(objects, "ConfigMap", "csghub-casdoor")["data"]["init_data.json"])
    org, app = gate_constant("GATE_CASDOOR_ORG"), gate_constant("GATE_CASDOOR_APP")
    assert any(o["name"] == org for o in seed["organizations"])
    application = next(a for a in seed["applications"] if a["name"] == app)
    assert application["organization"] == org and application["enablePassword"] is True
    assert any(u["owner"] == org and u["name"] == admin and u["isAdmin"] for u in seed["users"])
    # The registry: htpasswd auth (a Basic challenge), reached as <domain>:<http port>/v2 through the gateway,
    # which is also the host CSGHub gives spaces (the docker credential) and so the host registries.yaml names.
    assert _named(objects, "ConfigMap", "csghub-registry")["data"]["REGISTRY_AUTH"] == "htpasswd"
    portal = _named(objects, "HTTPRoute", "csghub-portal")
    assert portal["spec"]["hostnames"] == ["csghub.localhost"]
    v2 = [r for r in portal["spec"]["rules"] if any(m.get("path", {}).get("value") == "/v2" for m in r["matches"])]
    assert v2 and v2[0]["backendRefs"][0]["name"] == "csghub-registry"
    credential = _named(objects, "Secret", "csghub-docker-credential")["data"][".dockerconfigjson"]
    docker = json.loads(base64.b64decode(credential))
    assert list(docker["auths"]) == ["csghub.localhost:30080"]
    # Git over SSH: the gateway's TCP listener, exposed on the NodePort the guest is told.
    listeners = _named(objects, "Gateway", "listeners")["spec"]["listeners"]
    assert any(li["protocol"] == "TCP" and li["name"] == "gitssh" for li in listeners)
    proxy = _named(objects, "EnvoyProxy", "csghub-envoy-proxy")["spec"]["provider"]["kubernetes"]["envoyService"]
    ports = {p["name"]: p["nodePort"] for p in proxy["patch"]["value"]["spec"]["ports"]}
    env = guest_environment(load_config(None, [], "libvirt"))
    assert ports["tcp-22"] == int(env["CSGHUB_GIT_SSH_PORT"]) and ports["http-80"] == int(env["CSGHUB_HTTP_PORT"])
    # The workloads the failure lines point at.
    deployments = {o["metadata"]["name"] for o in objects_of_kind(objects, "Deployment")}
    assert {"csghub-portal", "csghub-casdoor", "csghub-gitlab-shell", "csghub-registry"} <= deployments
    # Knative's gateway proxies are ClusterIP (docs/networking.md): only the listeners proxy is a NodePort.
    types = {o["metadata"]["name"]: o["spec"]["provider"]["kubernetes"]["envoyService"]["type"]
             for o in objects_of_kind(objects, "EnvoyProxy")}
    assert types == {"csghub-envoy-proxy": "NodePort", "csghub-envoy-proxy-knative": "ClusterIP",
                     "csghub-envoy-proxy-knative-local": "ClusterIP"}


def test_a_domain_change_changes_the_casdoor_migrate_jobs_pod_template(helm_bin: Path) -> None:
    """Why reconfigure must delete finished Jobs first: their pod templates are immutable."""
    before = _named(_render(helm_bin), "Job", "csghub-casdoor-migrate")["spec"]["template"]
    after = _named(_render(helm_bin, "csghub.domain=csghub.192.168.56.10.nip.io"), "Job",
                   "csghub-casdoor-migrate")["spec"]["template"]
    assert before != after
    assert "csghub.192.168.56.10.nip.io" in json.dumps(after)


# -- csghub-reconfigure, for real, against the k3s stand-in -------------------------------------------


def reconfigure_in_namespace(tmp_path: Path, jobs: list[str], extra_env: dict[str, str] | None = None,
                             ) -> tuple[int, str, str, Path]:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("the reconfigure run needs root and unshare(1) for a private mount namespace")
    build = load_config(None, ["k3s.node_ip=10.254.254.1"], "libvirt", cwd=tmp_path)
    src = tmp_path / "manifests"
    src.mkdir()
    for name, obj in render_manifests(build).items():
        (src / name).write_text(manifest_yaml(obj))
    state, host, etc, appstate, out = (tmp_path / n for n in ("state", "host", "etc", "appstate", "out"))
    for d in (state, host, etc, appstate, out):
        d.mkdir()
    (state / "jobs").write_text("".join(f"{j}\n" for j in jobs))
    (state / "secrets").write_text(
        "csghub-registry REGISTRY_USERNAME registry\ncsghub-registry REGISTRY_PASSWORD pw1\n")
    (host / "active.k3s").touch()
    (etc / "appliance.env").write_text(
        "CSGHUB_DOMAIN=csghub.localhost\nCSGHUB_HTTP_PORT=30080\nK3S_NODE_IP=10.254.254.1\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    for tool in ("systemctl", "ip"):
        (fakebin / tool).symlink_to(FAKE_HOST)
    manifests = "/var/lib/rancher/k3s/server/manifests"
    wrapper = f"""
set -u
mount -t tmpfs tmpfs /usr/local
mount -t tmpfs tmpfs /var/lib
mkdir -p /usr/local/bin /usr/local/sbin {manifests}
install -m 0755 {FAKE_K3S} /usr/local/bin/k3s
printf '#!/bin/sh\\nexit 0\\n' >/usr/local/sbin/csghub-banner && chmod 0755 /usr/local/sbin/csghub-banner
cp {src}/* {manifests}/
bash {FIRSTBOOT}/csghub-reconfigure --mode address --address 192.168.56.10 >{out}/out 2>{out}/err
echo $? >{out}/rc
cp {manifests}/* {out}/
"""
    env = {
        "PATH": f"{fakebin}:/usr/local/bin:{os.environ['PATH']}", "LANG": "C.UTF-8",
        "FAKE_K3S_STATE": str(state), "FAKE_HOST_STATE": str(host),
        "CSGHUB_LIB": str(FIRSTBOOT / "lib.sh"), "CSGHUB_READINESS_LIB": str(READINESS),
        "CSGHUB_STACK_LIB": str(PROJECT_ROOT / "provision" / "files" / "csghub" / "lib.sh"),
        "CSGHUB_ETC": str(etc), "CSGHUB_STATE": str(appstate), "K3S_REGISTRIES": str(tmp_path / "registries.yaml"),
        "GATE_HOSTS_FILE": str(tmp_path / "hosts"), "GATE_POLL_SECONDS": "1", **(extra_env or {}),
    }
    subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", wrapper], env=env, check=True,
                   timeout=300)
    return int((out / "rc").read_text()), (out / "out").read_text(), (out / "err").read_text(), out


MIGRATE_DONE = ["csghub/csghub-casdoor-migrate Complete=True,SuccessCriteriaMet=True,",
                "csghub/csghub-server-migrate Complete=True,", "csghub/csghub-minio-init Complete=True,"]


def test_reconfigure_deletes_finished_jobs_before_the_upgrade(tmp_path: Path) -> None:
    rc, out, err, files = reconfigure_in_namespace(tmp_path, MIGRATE_DONE)
    assert rc == 0, out + err
    domain = "csghub.192.168.56.10.nip.io"
    calls = (tmp_path / "state" / "calls.log").read_text().splitlines()
    deleted = calls.index(
        "kubectl --request-timeout=20s -n csghub delete job csghub-casdoor-migrate --ignore-not-found")
    upgrade_checked = next(i for i, c in enumerate(calls) if "get job helm-install-csghub" in c)
    assert deleted < upgrade_checked
    assert (tmp_path / "state" / "jobs").read_text() == ""  # all three finished Jobs were deleted
    assert "changed: deleted finished job csghub/csghub-casdoor-migrate (the upgrade runs it again)" in out
    assert f"changed: Helm values for this copy: domain {domain}" in out
    assert f'"{domain}"' in (files / "csghub-appliance-instance.yaml").read_text()
    # CoreDNS reloaded for the new names, registries.yaml follows the domain (k3s restarted once for it).
    assert f"changed: in-cluster DNS answers for {domain}" in out
    assert f"changed: restarted CoreDNS to load the names of {domain}" in out
    registries = yaml.safe_load((tmp_path / "registries.yaml").read_text())
    assert list(registries["mirrors"]) == [f"{domain}:30080"]
    assert (tmp_path / "host" / "calls.log").read_text().count("systemctl restart k3s.service") == 1
    assert "ok: Helm release csghub/csghub upgraded (job kube-system/helm-install-csghub)" in out
    assert f"DOMAIN={domain}" in (tmp_path / "appstate" / "access.env").read_text()
    assert "systemctl restart --no-block csghub-ready.service" in (tmp_path / "host" / "calls.log").read_text()


def test_reconfigure_refuses_to_upgrade_under_a_running_job_and_says_so(tmp_path: Path) -> None:
    running = [MIGRATE_DONE[0], "csghub/csghub-server-migrate "]
    rc, _out, err, files = reconfigure_in_namespace(tmp_path, running, {"CSGHUB_JOB_WAIT_SECONDS": "0"})
    assert rc == 1
    assert "error: job csghub/csghub-server-migrate of the release is still running" in err
    assert "csghub-reconfigure: failed (see above); fix the cause and run csghub-reconfigure again" in err
    # Nothing that starts the upgrade was written, and access.env still names the old domain (a rerun resumes).
    assert not (files / "csghub-appliance-instance.yaml").exists()
    assert not (tmp_path / "appstate" / "access.env").exists()


def test_the_stand_in_rejects_an_upgrade_over_a_finished_job(tmp_path: Path) -> None:
    """The stand-in's helm-controller models the failure reconfigure avoids: with a finished Job left over, the
    upgrade fails, and wait_helm_upgrade reports it with the logs to read."""
    state = tmp_path / "state"
    manifests = Path("/var/lib/rancher/k3s/server/manifests")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1)")
    state.mkdir()
    (state / "jobs").write_text(MIGRATE_DONE[0] + "\n")
    script = f"""
set -u
mount -t tmpfs tmpfs /usr/local; mount -t tmpfs tmpfs /var/lib
mkdir -p /usr/local/bin {manifests}
install -m 0755 {FAKE_K3S} /usr/local/bin/k3s
touch {manifests}/csghub.yaml {manifests}/csghub-appliance-instance.yaml
. {READINESS}
GATE_POLL_SECONDS=1 wait_helm_upgrade 0 30
"""
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], capture_output=True,
                          text=True, env={"PATH": f"/usr/local/bin:{os.environ['PATH']}", "FAKE_K3S_STATE": str(state)},
                          timeout=120)
    assert proc.returncode == 1
    assert ("error: the upgrade of the Helm release failed (job helm-install-csghub failed 5 times); logs: "
            "sudo k3s kubectl -n kube-system logs job/helm-install-csghub") in proc.stderr


def test_retry_forgets_a_failed_revision_reruns_finished_jobs_and_the_helm_job(tmp_path: Path) -> None:
    """What `csghub-status --retry` does to the cluster (against the k3s stand-in on PATH)."""
    state, fakebin = tmp_path / "state", tmp_path / "bin"
    state.mkdir()
    fakebin.mkdir()
    (fakebin / "k3s").symlink_to(FAKE_K3S)
    (state / "jobs").write_text("csghub/csghub-server-migrate Failed=True,\ncsghub/csghub-minio-init Complete=True,\n"
                                "csghub/csghub-casdoor-migrate \n")
    (state / "helm_failed").write_text("secret/sh.helm.release.v1.csghub.v2\n")
    out = bash("retry_release", env={"PATH": f"{fakebin}:{os.environ['PATH']}", "FAKE_K3S_STATE": str(state)}).stdout
    assert "changed: forgot the failed Helm revision of csghub/csghub" in out
    assert (state / "helm_failed").read_text() == ""
    assert "changed: deleted finished job csghub/csghub-server-migrate" in out
    assert "changed: deleted finished job csghub/csghub-minio-init" in out
    # A Job still running is left alone (deleting it would abort a migration half-way).
    assert (state / "jobs").read_text().split() == ["csghub/csghub-casdoor-migrate"]
    assert "ok: a job of the release is still running; it is left to finish" in out
    assert "changed: the helm-controller applies the release csghub/csghub again" in out
    assert "annotate --overwrite helmchart csghub csghub-appliance/retried-at=" in (state / "calls.log").read_text()


# -- csghub-ready, a copy's boot, for real against the k3s stand-in ------------------------------------

GATE_STATE = {
    "jobs": MIGRATE_DONE,
    "secrets": [f"csghub-casdoor-init INIT_ADMIN_USER {ADMIN[0]}",
                f"csghub-casdoor-init INIT_ADMIN_PASSWORD {ADMIN[1]}",
                "csghub-registry REGISTRY_USERNAME registry", "csghub-registry REGISTRY_PASSWORD pw1"],
    "httproutes": ["csghub.localhost", "casdoor.csghub.localhost"],
}


@pytest.mark.parametrize(
    ("extra", "timeout", "rc", "line"),
    [
        ({"workloads": ["Deployment csghub/csghub-portal 1 2"]}, "600", 0, "ready"),
        # Offline, an image that is not in the store never arrives: failed at once, not "starting" for an hour.
        ({"workloads": ["Deployment csghub/csghub-server 1 999"],
          "pod_states": ["csghub/csghub-server-0 docker.io/busybox:latest= "
                         "docker.io/opencsghq/x:v1=ErrImageNeverPull"]},
         "600", 3, "failed: image docker.io/opencsghq/x:v1 of pod csghub/csghub-server-0 is not in the image store "
                   "(ErrImageNeverPull)"),
        # Never "starting" forever: the deadline turns what is pending into the failure.
        ({"workloads": ["StatefulSet csghub/csghub-postgresql 1 999"]}, "3", 3,
         "failed: statefulset csghub/csghub-postgresql not ready in time — "
         "sudo k3s kubectl -n csghub describe statefulset csghub-postgresql; then sudo csghub-status --retry"),
    ],
    ids=["ready", "missing-image", "deadline"],
)
# rc 3: the gate's "failed" verdict, which csghub-ready.service counts as success (SuccessExitStatus=3).
def test_a_copys_gate_ends_ready_or_failed(tmp_path: Path, gateway: int, git_sshd: int,  # noqa: F811
                                           extra: dict[str, list[str]], timeout: str, rc: int, line: str) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("the csghub-ready run needs root and unshare(1) for a private mount namespace")
    state, host, etc, out = (tmp_path / n for n in ("state", "host", "etc", "out"))
    for d in (state, host, etc, out):
        d.mkdir()
    for name, content in {**GATE_STATE, **extra}.items():
        (state / name).write_text("".join(f"{x}\n" for x in content))
    (etc / "appliance.env").write_text(f"CSGHUB_HTTP_PORT={gateway}\nK3S_NODE_IP=127.0.0.1\n"
                                       f"CSGHUB_GIT_SSH_PORT={git_sshd}\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    (fakebin / "systemctl").symlink_to(FAKE_HOST)
    wrapper = f"""
set -u
mount -t tmpfs tmpfs /usr/local
mount -t tmpfs tmpfs /var/lib
mkdir -p /usr/local/bin /usr/local/sbin /var/lib/rancher/k3s/server/manifests
install -m 0755 {FAKE_K3S} /usr/local/bin/k3s
printf '#!/bin/sh\\nexit 0\\n' >/usr/local/sbin/csghub-banner && chmod 0755 /usr/local/sbin/csghub-banner
touch /var/lib/rancher/k3s/server/manifests/csghub.yaml
bash {FIRSTBOOT}/csghub-ready >{out}/out 2>{out}/err
echo $? >{out}/rc
"""
    env = {
        "PATH": f"{fakebin}:/usr/local/bin:{os.environ['PATH']}", "LANG": "C.UTF-8",
        "FAKE_K3S_STATE": str(state), "FAKE_HOST_STATE": str(host),
        "CSGHUB_LIB": str(FIRSTBOOT / "lib.sh"), "CSGHUB_READINESS_LIB": str(READINESS),
        "CSGHUB_ETC": str(etc), "CSGHUB_STATE": str(tmp_path / "appstate"),
        "CSGHUB_READINESS": str(tmp_path / "ready"),
        "K3S_REGISTRIES": str(tmp_path / "registries.yaml"), "GATE_HOSTS_FILE": str(tmp_path / "hosts"),
        "CSGHUB_POLL_SECONDS": "1", "CSGHUB_READY_TIMEOUT": timeout, "CSGHUB_SERIAL": str(tmp_path / "no-serial"),
    }
    subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", wrapper], env=env, check=True,
                   timeout=300)
    output = (out / "out").read_text() + (out / "err").read_text()
    assert int((out / "rc").read_text()) == rc, output
    assert (tmp_path / "ready").read_text().startswith(line), output
    assert f"progress: {line}" in output
    # The copy's registries.yaml, with the credentials the cluster holds.
    registries = yaml.safe_load((tmp_path / "registries.yaml").read_text())
    assert registries["configs"][f"csghub.localhost:{gateway}"]["auth"] == {"username": "registry", "password": "pw1"}
