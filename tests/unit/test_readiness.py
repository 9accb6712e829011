"""The readiness gate (provision/files/common/readiness.sh), registries.yaml, a reconfigure that keeps the release.

The gate's decisions are pure bash functions: canned facts in, one status line out, and each failure must give the
right line. The names the gate relies on (Jobs, Secrets and their keys, Casdoor's organization and application, the
registry route and its auth, the git SSH listener) are checked against the real chart 2.4.0 rendered by a real helm.
The probes run against real components where they run here (a real OpenSSH sshd and `git upload-pack` behind the
gitlab-sshd stand-in, curl against a loopback HTTP server for the gateway). csghub-reconfigure runs for real in a
private mount namespace against the k3s stand-in (tests/data/fake_k3s.py), whose helm-controller rejects an upgrade
while a finished Job of the release still exists, as Kubernetes does (a Job's pod template is immutable).
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

from appliance.config import PROJECT_ROOT, load_config
from appliance.guest import guest_environment
from appliance.manifests import manifest_yaml, render_manifests
from appliance.values import generate_values
from tests.chart import objects_of_kind, render_chart_once
from tests.csghub_stand_in import Gateway
from tests.unit.test_manifests_scripts import (  # noqa: F401  (fixtures)
    ADMIN,
    COPY,
    GIT_SSH_USER,
    gateway,
    git_sshd,
    gitlab_sshd,
    stand_in,
)

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
# In the order gate_facts gives them.
ENDPOINTS = ["knative knative-serving/knative-serving ready", "portal 200", "server 200 OK", "login ok",
             "gitssh ok", "registry 200 - pushed"]
RETRY = "; then sudo csghub-status --retry"


def test_everything_answering_is_ready() -> None:
    assert verdict(*UP, *ENDPOINTS) == "ready"
    # The admin changed the password after a sign-in proved here: no sign-in, so no key to clone with; no fault.
    facts = _without("login", "login changed")
    facts[facts.index("gitssh ok")] = "gitssh skipped"
    assert verdict(*facts) == "ready"
    # Knative left out of this build (no CRD): no knative fact, nothing to wait for.
    assert verdict(*UP, *ENDPOINTS[1:]) == "ready"


def _without(prefix: str, *replacement: str) -> list[str]:
    """UP and ENDPOINTS with the fact starting with ``prefix`` replaced."""
    facts = [*UP, *ENDPOINTS]
    i = next(n for n, f in enumerate(facts) if f.startswith(prefix))
    return [*facts[:i], *replacement, *facts[i + 1:]]


@pytest.mark.parametrize(
    ("facts", "line"),
    [
        (["api down"], "starting (0/1): waiting for the cluster API"),
        (["api up", "release installing"], "starting (1/2): waiting for the Helm release csghub/csghub"),
        (_without("job csghub/csghub-casdoor-migrate", "job csghub/csghub-casdoor-migrate running"),
         "starting (12/13): waiting for job csghub/csghub-casdoor-migrate"),
        (_without("workload StatefulSet", "workload StatefulSet csghub/csghub-postgresql waiting"),
         "starting (12/13): waiting for statefulset csghub/csghub-postgresql"),
        (_without("knative", "knative knative-serving/knative-serving waiting"),
         "starting (12/13): waiting for KnativeServing knative-serving/knative-serving to report Ready"),
        (_without("knative", "knative none"),
         "starting (12/13): waiting for a KnativeServing (the Knative operator makes it)"),
        (_without("portal", "portal 503"), "starting (12/13): waiting for the portal through the gateway (HTTP 503)"),
        # A redirect on / is not the portal rendering its page (the login service, or a misrouted Host).
        (_without("portal", "portal 302"), "starting (12/13): waiting for the portal through the gateway (HTTP 302)"),
        (_without("server", "server 502 -"),
         "starting (12/13): waiting for csghub-server's API through the gateway (HTTP 502)"),
        (_without("login", "login down"),
         "starting (12/13): waiting for the admin's sign-in through CSGHub's OAuth flow"),
        # Five wrong passwords from anyone lock the admin for a while: that ends by itself.
        (_without("login", "login waiting Casdoor has locked the admin after failed sign-ins (You have entered the "
                           "wrong password or code too many times, please wait for 15 minutes and try again)"),
         "starting (12/13): waiting for the admin's sign-in through CSGHub's OAuth flow (Casdoor has locked the admin "
         "after failed sign-ins (You have entered the wrong password or code too many times, please wait for 15 "
         "minutes and try again))"),
        (_without("gitssh", "gitssh down"),
         "starting (12/13): waiting for a clone over SSH (after the admin's sign-in)"),
        (_without("gitssh",
                  "gitssh waiting git over SSH: ssh: connect to host 10.0.2.15 port 30022: Connection refused"),
         "starting (12/13): waiting for a clone over SSH (git over SSH: ssh: connect to host 10.0.2.15 port 30022: "
         "Connection refused)"),
        # Not CSGHub's registry (or not through the gateway), or an auth scheme it does not use.
        (_without("registry", "registry 404 -"),
         "starting (12/13): waiting for the registry's /v2/ with this copy's credentials (HTTP 404)"),
        (_without("registry", "registry 401 Bearer"),
         "starting (12/13): waiting for the registry's /v2/ with this copy's credentials (HTTP 401)"),
        # /v2/ lets the credentials in, but a push does not go through (yet: the object store starting, say).
        (_without("registry", "registry 200 - waiting manifest-push 500"),
         "starting (12/13): waiting for a push and pull of a test image to the registry (manifest-push 500)"),
        # At build time (online) a missing image is being pulled.
        ([*UP, "pull csghub/csghub-server-0 opencsghq/csghub-server:v2.4.0-ce ErrImagePull", *ENDPOINTS],
         "starting (13/13): waiting for pulling image opencsghq/csghub-server:v2.4.0-ce for csghub/csghub-server-0"),
    ],
    ids=["api", "release", "job", "workload", "knative", "knative-none", "portal", "portal-302", "server", "login",
         "lockout", "gitssh", "gitssh-no-answer", "registry-404", "registry-bearer", "registry-push", "pull"],
)
def test_pending_checks_say_starting_with_counts(facts: list[str], line: str) -> None:
    assert verdict(*facts) == line


@pytest.mark.parametrize(
    ("facts", "line"),
    [
        (["api up", "release failed job helm-install-csghub failed 5 times"],
         "failed: the Helm release csghub/csghub did not install (job helm-install-csghub failed 5 times) — "
         "sudo k3s kubectl -n kube-system logs job/helm-install-csghub" + RETRY),
        (_without("job csghub/csghub-server-migrate", "job csghub/csghub-server-migrate failed"),
         "failed: job csghub/csghub-server-migrate failed — sudo k3s kubectl -n csghub logs job/csghub-server-migrate"
         + RETRY),
        (_without("login", "login refused the admin's password (Secret csghub-casdoor-init) was refused: password or "
                           "code is incorrect"),
         "failed: the admin's sign-in through CSGHub's OAuth flow failed: the admin's password (Secret "
         "csghub-casdoor-init) was refused: password or code is incorrect — "
         "sudo k3s kubectl -n csghub logs deploy/csghub-casdoor" + RETRY),
        (_without("registry", "registry 401 Basic"),
         "failed: the registry refused this copy's credentials (Secret csghub-registry: its htpasswd does not take "
         "REGISTRY_PASSWORD) — sudo k3s kubectl -n csghub logs deploy/csghub-registry" + RETRY),
        (_without("registry", "registry 200 - refused layer-upload"),
         "failed: the registry let this copy's credentials read but refused a push (layer-upload: HTTP 401) — "
         "sudo k3s kubectl -n csghub logs deploy/csghub-registry" + RETRY),
        # Offline (a copy's boot) a missing image never arrives.
        ([*UP, "pull csghub/csghub-server-0 opencsghq/csghub-server:v2.4.0-ce ImagePullBackOff", "offline yes"],
         "failed: image opencsghq/csghub-server:v2.4.0-ce of pod csghub/csghub-server-0 is not in the image store "
         "(ImagePullBackOff) — sudo k3s ctr -n k8s.io images ls | grep opencsghq/csghub-server:v2.4.0-ce "
         "(the image is missing from this image store)" + RETRY),
        # Never "starting" forever: at the deadline the first pending check is the failure.
        ([*UP[:5], "workload StatefulSet csghub/csghub-postgresql waiting", "expired yes"],
         "failed: statefulset csghub/csghub-postgresql not ready in time — "
         "sudo k3s kubectl -n csghub describe statefulset csghub-postgresql" + RETRY),
        (_without("gitssh", "gitssh refused gitlab-shell did not let in the admin's SSH key"),
         "failed: a clone over SSH failed: gitlab-shell did not let in the admin's SSH key — "
         "sudo k3s kubectl -n csghub logs deploy/csghub-gitlab-shell" + RETRY),
        ([*_without("gitssh", "gitssh waiting no answer"), "expired yes"],
         "failed: a clone over SSH (no answer) not ready in time — "
         "sudo k3s kubectl -n csghub logs deploy/csghub-gitlab-shell" + RETRY),
        ([*_without("knative", "knative knative-serving/knative-serving waiting"), "expired yes"],
         "failed: KnativeServing knative-serving/knative-serving to report Ready not ready in time — "
         "sudo k3s kubectl get knativeservings.operator.knative.dev -A -o yaml" + RETRY),
        (["api down", "expired yes"],
         "failed: the cluster API not ready in time — sudo systemctl status k3s; sudo journalctl -u k3s" + RETRY),
    ],
    ids=["release", "job", "login", "registry", "registry-push", "image-offline", "deadline-workload", "gitssh",
         "deadline-gitssh",
         "deadline-knative", "deadline-api"],
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
    workloads = bash("workload_facts spaces",
                     "Deployment csghub/portal want=1 ready=1 gen=3 seen=3 updated=1 total=1\n"
                     "Deployment csghub/server want= ready= gen=1 seen= updated= total=\n"
                     "Deployment spaces/user-app want=1 ready=0 gen=1 seen=1 updated=1 total=1\n"
                     "DaemonSet kube-system/x want=1 ready=0 gen=1 seen=1 updated=1\n"
                     "DaemonSet kube-system/y want=0 ready= gen=1 seen=1 updated=\n").stdout
    assert workloads.splitlines() == ["workload Deployment csghub/portal ready",
                                      "workload Deployment csghub/server waiting",
                                      "workload DaemonSet kube-system/x waiting",
                                      "workload DaemonSet kube-system/y ready"]
    pulls = bash("pull_facts spaces", "csghub/p docker.io/busybox:latest= docker.io/a/b:1=ErrImagePull\n"
                                      "spaces/u x:1=ImagePullBackOff\n"
                                      "csghub/q reg:5000/c@sha256:ab=ErrImageNeverPull\n").stdout
    assert pulls.splitlines() == ["pull csghub/p docker.io/a/b:1 ErrImagePull",
                                  "pull csghub/q reg:5000/c@sha256:ab ErrImageNeverPull"]


@pytest.mark.parametrize(("line", "state"), [
    # A rollout (first boot's upgrade, a reconfigure): the old pod is ready, the new one is not.
    ("Deployment csghub/csghub-server want=1 ready=1 gen=2 seen=2 updated=1 total=2", "waiting"),
    ("Deployment csghub/csghub-server want=1 ready=1 gen=2 seen=2 updated=0 total=1", "waiting"),
    # The controller has not yet seen the change the upgrade made.
    ("Deployment csghub/csghub-server want=1 ready=1 gen=3 seen=2 updated=1 total=1", "waiting"),
    ("StatefulSet csghub/csghub-registry want=1 ready=1 gen=2 seen=2 updated=0 total=1", "waiting"),
    ("DaemonSet kube-system/svclb want=1 ready=1 gen=2 seen=2 updated=0", "waiting"),
    ("DaemonSet kube-system/svclb want=1 ready=1 gen=2 seen=1 updated=1", "waiting"),
    # Done: every replica runs the current template and is ready.
    ("Deployment csghub/csghub-server want=2 ready=2 gen=4 seen=4 updated=2 total=2", "ready"),
    ("StatefulSet csghub/csghub-registry want=1 ready=1 gen=2 seen=2 updated=1 total=1", "ready"),
    ("DaemonSet kube-system/svclb want=1 ready=1 gen=2 seen=2 updated=1", "ready"),
])
def test_a_workload_in_rollout_is_not_ready(line: str, state: str) -> None:
    """Ready pods of the old template do not make a workload ready (kubectl rollout status's rule)."""
    kind, name = line.split()[:2]
    assert bash("workload_facts spaces", line + "\n").stdout.strip() == f"workload {kind} {name} {state}"


def test_casdoor_bodies_are_json_with_the_secrets_escaped() -> None:
    body = json.loads(bash(f"casdoor_code_login_body root {shlex.quote(ADMIN[1])}").stdout)
    assert body == {"type": "code", "organization": "OpenCSG", "application": "CSGHub", "username": "root",
                    "password": ADMIN[1], "autoSignin": True, "signinMethod": "Password"}
    assert bash("casdoor_code_login_body root $'a\\nb'", check=False).returncode != 0
    token = json.loads(bash("casdoor_token_body id 'se\"cret' code1 http://h/api/v1/callback/casdoor").stdout)
    assert token == {"grant_type": "authorization_code", "client_id": "id", "client_secret": 'se"cret', "code": "code1",
                     "redirect_uri": "http://h/api/v1/callback/casdoor"}


# Casdoor v3.62.0's answers to a type "code" sign-in, as the chart configures it (enableErrorMask on):
# object/check.go, object/check_util.go, object/token_oauth_util.go, controllers/auth.go.
@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ('{"status":"ok","msg":"","data":"a1b2c3d4e5f6a7b8c9d0","data2":null}', "code a1b2c3d4e5f6a7b8c9d0"),
        # Beego indents JSON outside its prod run mode (the chart sets none).
        ('{\n  "status": "ok",\n  "msg": "",\n  "data": "a1b2c3d4e5f6a7b8c9d0",\n  "data2": null,\n  "data3": false\n}',
         "code a1b2c3d4e5f6a7b8c9d0"),
        ('{"status":"error","msg":"You have entered the wrong password or code too many times, please wait for 15 '
         'minutes and try again","data":null}',
         "waiting Casdoor has locked the admin after failed sign-ins (You have entered the wrong password or code too "
         "many times, please wait for 15 minutes and try again)"),
        ('{"status":"error","msg":"password or code is incorrect","data":null}',
         "password the admin's password (Secret csghub-casdoor-init) was refused: password or code is incorrect"),
        ('{"status":"error","msg":"Invalid client_id","data":null}',
         "refused Casdoor knows no application with the portal's client id (ConfigMap csghub-core, "
         "CSGHUB_PORTAL_LOGIN_URL): Invalid client_id"),
        ('{"status":"error","msg":"Redirect URI: http://x/cb doesn\'t exist in the allowed Redirect URI list"}',
         "refused Casdoor does not allow the portal's redirect URI (ConfigMap csghub-core, CSGHUB_PORTAL_LOGIN_URL): "
         "Redirect URI: http://x/cb doesn't exist in the allowed Redirect URI list"),
        ('{"status":"error","msg":"The application: admin/CSGHub does not exist"}',
         "refused Casdoor refused the sign-in: The application: admin/CSGHub does not exist"),
        # Anything else may be Casdoor still starting (its database): wait.
        ('{"status":"error","msg":"dial tcp 10.43.0.9:5432: connect: connection refused"}',
         "waiting Casdoor answered: dial tcp 10.43.0.9:5432: connect: connection refused"),
        ("<html>", "waiting Casdoor answered: <html>"),
    ],
    ids=["code", "code-indented", "lockout", "password", "client-id", "redirect", "application", "other", "html"],
)
def test_casdoor_code_outcome(answer: str, outcome: str) -> None:
    assert bash("casdoor_code_outcome", answer).stdout.strip() == outcome


def test_casdoor_token_outcome() -> None:
    assert bash("casdoor_token_outcome 200", '{"access_token":"a.b.c","id_token":"a.b.c"}').stdout.strip() == (
        "token a.b.c")
    refused = bash("casdoor_token_outcome 401", '{"error":"invalid_client","error_description":"client_secret is '
                   'invalid for application: [admin/CSGHub], token.CodeChallenge: empty"}').stdout.strip()
    assert refused == ("refused Casdoor refused csghub-server's OAuth client secret (ConfigMap csghub-core, "
                       "STARHUB_SERVER_CASDOOR_CLIENT_SECRET): client_secret is invalid for application: "
                       "[admin/CSGHub], token.CodeChallenge: empty")
    assert bash("casdoor_token_outcome 400", '{"error":"invalid_grant"}').stdout.strip() == (
        "waiting Casdoor's token endpoint answered HTTP 400 invalid_grant")


def test_jwt_signature_is_checked_against_the_certificate(tmp_path: Path) -> None:
    """The gate's openssl check accepts a token Casdoor signed with the certificate's key, and no other."""
    from tests.csghub_stand_in import certificate_pem, new_signing_key

    services = COPY.stand_in()
    services.codes["c"] = "root"
    _, answer = services.casdoor_token({"code": "c", "client_id": COPY.client_id, "client_secret": COPY.client_secret})
    token = answer["access_token"]
    (tmp_path / "right.pem").write_text(COPY.certificate)
    (tmp_path / "other.pem").write_text(certificate_pem(new_signing_key()))
    check = f"jwt_signed_by {token} {tmp_path}/%s.pem && echo yes || echo no"
    assert bash(check % "right").stdout.strip() == "yes"
    assert bash(check % "other").stdout.strip() == "no"
    head, payload, sig = token.split(".")
    tampered = f"{head}.{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{sig}"
    assert bash(f"jwt_signed_by {tampered} {tmp_path}/right.pem && echo yes || echo no").stdout.strip() == "no"
    assert bash(f"jwt_signed_by not-a-token {tmp_path}/right.pem && echo yes || echo no").stdout.strip() == "no"


def test_url_helpers() -> None:
    assert bash(f"url_query_value client_id {shlex.quote(COPY.login_url)}").stdout == COPY.client_id
    assert bash(f"url_query_value redirect_uri {shlex.quote(COPY.login_url)}").stdout == COPY.redirect_uri
    assert bash("url_query_value nothing 'http://x/?a=1'").stdout == ""
    assert bash("url_encode 'http://a:1/b c?d=e&f'").stdout == "http%3A%2F%2Fa%3A1%2Fb%20c%3Fd%3De%26f"


def test_callback_and_git_outcomes() -> None:
    """Where csghub-server's callback redirected, and how the upload-pack exchange ended, read as upstream answers
    them (redirects as csghub-server v2.4.0-ce user/handler/user.go builds them)."""
    from tests.csghub_stand_in import hs256_jwt

    jwt = hs256_jwt(b"k", {"current_user": "root", "uuid": "u-1"})
    assert bash(f"callback_outcome 'http://csghub.localhost:30080/server/callback?jwt={jwt}'").stdout == f"jwt {jwt}\n"
    assert bash(f"jwt_claim current_user {jwt}").stdout.strip() == "root"
    refused = ("http://x/errors/server-error?error_code=500&error_message=failed+to+signin%3A+failed+to+get+token+from"
               "+casdoor%2Cerror%3Aoauth2%3A+%22invalid_client%22+%22client_secret+is+invalid%22")
    out = bash(f"callback_outcome {shlex.quote(refused)}").stdout
    assert out.startswith("refused csghub-server's own sign-in (its callback /api/v1/callback/casdoor) was refused by "
                          "Casdoor: csghub-server holds another client secret"), out
    assert out.rstrip().endswith('failed to signin: failed to get token from casdoor,error:oauth2: "invalid_client" '
                                 '"client_secret is invalid"'), out
    transient = "http://x/errors/server-error?error_code=500&error_message=failed%20to%20signin%3A%20db%20down"
    assert bash(f"callback_outcome {shlex.quote(transient)}").stdout == (
        "waiting csghub-server's callback: failed to signin: db down\n")
    assert bash("callback_outcome ''").stdout.startswith("waiting csghub-server's callback")
    assert bash("callback_outcome 'http://x/?jwt=not-a-jwt'").stdout.startswith("waiting")
    # A percent sign, a backslash and a plus decode as themselves, nothing else is interpreted.
    assert bash("url_decode 'a%25b%5Cn+c'").stdout == "a%b\\n c"
    assert bash("url_decode 'x\\ty'").stdout == "x\\ty"
    assert bash("git_outcome 0", "").stdout.strip() == "ok"
    assert bash("git_outcome 255", "git@10.0.2.15: Permission denied (publickey).\n").stdout.startswith(
        "refused gitlab-shell did not let in the admin's SSH key")
    assert bash("git_outcome 1", "remote: The project you were looking for could not be found.\n").stdout.startswith(
        "refused git over SSH let the admin in but found no repository csghub-appliance-readiness")
    assert bash("git_outcome 255", "ssh: connect to host 10.0.2.15 port 30022: Connection refused\n").stdout == (
        "waiting git over SSH: ssh: connect to host 10.0.2.15 port 30022: Connection refused\n")
    assert bash("git_outcome 124", "").stdout == "waiting git over SSH: exit 124\n"


def test_remembered_job_failures_outlive_the_job() -> None:
    facts = "job csghub/a complete\njob csghub/b running\n"
    out = bash("with_remembered_failures $'csghub/c\\ncsghub/b'", facts).stdout.splitlines()
    # c was seen failed and is gone (its TTL): still failed; b exists again (a retry) and speaks for itself.
    assert out == ["job csghub/a complete", "job csghub/b running", "job csghub/c failed"]
    assert bash("knative_facts", "knative-serving/ks True\nx/y False\n").stdout.splitlines() == [
        "knative knative-serving/ks ready", "knative x/y waiting"]
    assert bash("knative_facts", "").stdout.strip() == "knative none"
    assert [bash(f"registry_state {c} {s} {push}").stdout.strip() for c, s, push in
            [(200, "-", "pushed"), (200, "-", "refused"), (200, "-", "waiting"), (200, "-", "-"), (401, "Basic", "-"),
             (401, "Bearer", "-"), (503, "-", "-")]] == ["ok", "pushrefused", "waiting", "waiting", "refused",
                                                         "waiting", "waiting"]


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
    return {"CSGHUB_HTTP_PORT": str(port), "K3S_NODE_IP": "127.0.0.1", "CSGHUB_GIT_SSH_PORT": str(git_port),
            "GATE_GIT_SSH_USER": GIT_SSH_USER}


def test_the_gateway_stand_in_routes_as_envoy_and_the_portal_do(gateway: int) -> None:  # noqa: F811
    env = probe_env(gateway)
    assert bash("gate_http_code csghub.localhost /", env=env).stdout.strip() == "200"
    assert bash("gate_http_code csghub.localhost /models", env=env).stdout.strip() == "302"  # the portal: sign in
    assert bash("gate_http_code unknown.localhost /", env=env).stdout.strip() == "404"  # Envoy: no route
    assert bash("gate_server_fact csghub.localhost", env=env).stdout.strip() == "server 200 OK"
    assert bash("gate_http_code csghub.localhost /", env=probe_env(1)).stdout.strip() == "000"


def cluster(tmp_path: Path, state: dict[str, list[str]]) -> dict[str, str]:
    """The k3s stand-in on PATH with ``state``; the environment for the gate's probes."""
    folder = tmp_path / "state"
    folder.mkdir(exist_ok=True)
    for name, content in state.items():
        (folder / name).write_text("".join(f"{x}\n" for x in content))
    fakebin = tmp_path / "bin"
    fakebin.mkdir(exist_ok=True)
    if not (fakebin / "k3s").exists():
        (fakebin / "k3s").symlink_to(FAKE_K3S)
    return {"PATH": f"{fakebin}:{os.environ['PATH']}", "FAKE_K3S_STATE": str(folder)}


GATE_FACTS_STATE = {
    "jobs": ["csghub/csghub-server-migrate Complete=True,", "csghub/csghub-casdoor-migrate Complete=True,"],
    "workloads": ["Deployment csghub/csghub-portal 1 1", "Deployment csghub/csghub-casdoor 1 1"],
    "httproutes": ["csghub.localhost", "casdoor.csghub.localhost"],
    **COPY.cluster_state(),
}


def gate_line(tmp_path: Path, port: int, git_port: int, state: dict[str, list[str]] | None = None,
              extra: str = "") -> str:
    """One round of the gate (facts from the stand-ins, then the verdict), the release taken as deployed."""
    env = {**cluster(tmp_path, state or GATE_FACTS_STATE), **probe_env(port, git_port)}
    snippet = f'gate_release_fact() {{ echo "release deployed"; }}; {extra} gate_facts csghub.localhost | gate_verdict'
    return bash(snippet, env=env).stdout.strip()


def test_a_correct_copy_is_ready(tmp_path: Path, stand_in: Gateway, git_sshd: int) -> None:  # noqa: F811
    assert gate_line(tmp_path, stand_in.port, git_sshd) == "ready"
    # What a user does, each through the gateway with this copy's Host names.
    asked = [(m, h, p) for m, h, p in stand_in.stand_in.requests]
    assert ("POST", "casdoor.csghub.localhost", "/api/login") in asked
    assert ("POST", "casdoor.csghub.localhost", "/api/login/oauth/access_token") in asked
    assert ("GET", "csghub.localhost", "/v2/") in asked
    assert ("GET", "csghub.localhost", "/api/v1/models") in asked
    # csghub-server's own callback signed the admin in; with its JWT a throwaway key was registered, a repository
    # made, its refs read over SSH (gitlab-sshd asked csghub-server's internal API whose key it was), both deleted.
    assert ("GET", "csghub.localhost", "/api/v1/callback/casdoor") in asked
    user = COPY.admin_user
    assert ("POST", "csghub.localhost", f"/api/v1/user/{user}/ssh_keys") in asked
    assert ("GET", "csghub-server", "/api/v4/internal/authorized_keys") in asked
    deleted_key = [p for m, h, p in asked if m == "DELETE" and p.startswith(f"/api/v1/user/{user}/ssh_key/")]
    assert len(deleted_key) == 1 and deleted_key[0].rsplit("/", 1)[1].startswith("csghub-appliance-readiness-")
    assert ("DELETE", "csghub.localhost", f"/api/v1/models/{user}/csghub-appliance-readiness") in asked
    assert stand_in.stand_in.ssh_keys == {}
    assert stand_in.stand_in.repos_root is not None and not any(stand_in.stand_in.repos_root.rglob("*.git"))


def test_the_probes_go_to_the_node_not_through_a_proxy_or_curlrc(tmp_path: Path, stand_in: Gateway,  # noqa: F811
                                                                 git_sshd: int) -> None:  # noqa: F811
    """A proxy in the environment or root's ~/.curlrc would get the admin's password and the registry's credentials
    (and --resolve does not apply through a proxy): the gate's curl ignores both."""
    import socket

    heard: list[bytes] = []
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(8)
    proxy.settimeout(0.2)
    port = proxy.getsockname()[1]
    home = tmp_path / "home"
    home.mkdir()
    (home / ".curlrc").write_text(f"proxy = http://127.0.0.1:{port}\n")
    extra = (f"export HOME={home} http_proxy=http://127.0.0.1:{port} HTTP_PROXY=http://127.0.0.1:{port} "
             f"all_proxy=http://127.0.0.1:{port};")
    try:
        line = gate_line(tmp_path, stand_in.port, git_sshd, extra=extra)
        while True:
            try:
                conn, _ = proxy.accept()
            except OSError:
                break
            with conn:
                conn.settimeout(0.5)
                try:
                    heard.append(conn.recv(65536))
                except OSError:
                    heard.append(b"(connected)")
    finally:
        proxy.close()
    assert heard == [], heard
    assert line == "ready"


@pytest.mark.parametrize(
    ("mismatch", "named"),
    [
        ("client_secret", "failed: the admin's sign-in through CSGHub's OAuth flow failed: Casdoor refused "
                          "csghub-server's OAuth client secret (ConfigMap csghub-core, "
                          "STARHUB_SERVER_CASDOOR_CLIENT_SECRET)"),
        ("client_id", "failed: the admin's sign-in through CSGHub's OAuth flow failed: Casdoor knows no application "
                      "with the portal's client id (ConfigMap csghub-core, CSGHUB_PORTAL_LOGIN_URL): "
                      "Invalid client_id"),
        ("redirect_uris", "failed: the admin's sign-in through CSGHub's OAuth flow failed: Casdoor does not allow the "
                          "portal's redirect URI (ConfigMap csghub-core, CSGHUB_PORTAL_LOGIN_URL): Redirect URI: "
                          "http://csghub.localhost:30080/api/v1/callback/casdoor doesn't exist in the allowed "
                          "Redirect URI list"),
        ("signing_key", "failed: the admin's sign-in through CSGHub's OAuth flow failed: Casdoor's token is not signed "
                        "by the certificate csghub-server checks tokens with (Secret csghub-casdoor-certs, tls.crt)"),
        ("admin_password", "failed: the admin's sign-in through CSGHub's OAuth flow failed: the admin's password "
                           "(Secret csghub-casdoor-init) was refused: password or code is incorrect"),
        ("htpasswd", "failed: the registry refused this copy's credentials (Secret csghub-registry: its htpasswd "
                     "does not take REGISTRY_PASSWORD)"),
        ("server_client_secret", "failed: the admin's sign-in through CSGHub's OAuth flow failed: csghub-server's "
                                 "own sign-in (its callback /api/v1/callback/casdoor) was refused by Casdoor: "
                                 "csghub-server holds another client secret than Casdoor's application CSGHub"),
        ("gitaly_jwt_secret", "failed: a clone over SSH failed: gitlab-shell did not let in the admin's SSH key "
                              "registered through CSGHub's API: it could not look the key up in csghub-server's "
                              "internal API (its JWT secret, gitaly.applianceJwtSecret in gitlab-shell's config.yml, "
                              "differs from csghub-server's STARHUB_SERVER_GITALY_JWT_SECRET)"),
    ],
)
def test_a_copy_whose_services_disagree_fails_naming_what(tmp_path: Path, stand_in: Gateway,  # noqa: F811
                                                          git_sshd: int, mismatch: str, named: str) -> None:  # noqa: F811
    """What each copy regenerates at its first boot, held by a service differently from what the cluster says."""
    from tests.csghub_stand_in import htpasswd_line, new_signing_key

    services = stand_in.stand_in
    if mismatch == "client_secret":
        services.client_secret = "another-copys-secret"
    elif mismatch == "client_id":
        services.client_id = "another-copys-client-id"
    elif mismatch == "redirect_uris":
        services.redirect_uris = ["http://another.localhost:30080/api/v1/callback/casdoor"]
    elif mismatch == "signing_key":
        services.signing_key = new_signing_key()  # the chart's fixed key, say, while csghub-server has this copy's
    elif mismatch == "admin_password":
        services.admin_password = "another-password"
    elif mismatch == "server_client_secret":
        services.server_client_secret = "csghub-servers-stale-secret"  # Casdoor's and the ConfigMap's agree
    elif mismatch == "gitaly_jwt_secret":
        services.gitaly_jwt_secret = "csghub-servers-own-secret"  # gitlab-shell signs with this copy's
    else:
        services.htpasswd = htpasswd_line(COPY.registry_user, "another-password")
    refusals = f"GATE_GIT_REFUSALS={tmp_path}/git-refusals;"
    if mismatch == "gitaly_jwt_secret":
        # gitlab-shell also refuses a key when its internal API call fails for a moment: definite only 3 polls in a row.
        for poll in (1, 2):
            line = gate_line(tmp_path, stand_in.port, git_sshd, extra=refusals)
            assert line.startswith("starting") and f"({poll} of 3 polls in a row" in line, line
    line = gate_line(tmp_path, stand_in.port, git_sshd, extra=refusals)
    assert line.startswith(named), line
    assert line.endswith("; then sudo csghub-status --retry")
    # Whatever failed, the throwaway key and repository are gone again.
    assert services.ssh_keys == {}
    assert services.repos_root is not None and not any(services.repos_root.rglob("*.git"))


def test_the_clone_probe_removes_what_an_earlier_run_left_and_reports_what_it_cannot(
        tmp_path: Path, stand_in: Gateway, git_sshd: int) -> None:  # noqa: F811
    """A gate killed mid-probe leaves a key and a repository on CSGHub: the next probe deletes both. A DELETE that
    fails is written down (the build fails on it, first boot warns), and a repository CSGHub could not make is
    waiting, not a failure."""
    services = stand_in.stand_in
    user = COPY.admin_user
    assert services.repos_root is not None
    services.ssh_keys[7] = (user, "csghub-appliance-readiness-00aa11bb22cc", "ssh-ed25519 AAAAleft-by-a-killed-run")
    services.ssh_keys[8] = (user, "the-admins-laptop", "ssh-ed25519 AAAAthe-admins-own")
    (services.repos_root / "models" / user).mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "--bare", str(services.repos_root / "models" / user
                                                        / "csghub-appliance-readiness.git")], check=True)
    leftovers = tmp_path / "git-leftovers"
    extra = f"GATE_GIT_LEFTOVERS={leftovers};"
    assert gate_line(tmp_path, stand_in.port, git_sshd, extra=extra) == "ready"
    assert list(services.ssh_keys.values()) == [(user, "the-admins-laptop", "ssh-ed25519 AAAAthe-admins-own")]
    assert not any(services.repos_root.rglob("*.git"))
    assert leftovers.read_text() == ""

    services.key_deletes_fail = True
    assert gate_line(tmp_path, stand_in.port, git_sshd, extra=extra) == "ready"
    left = leftovers.read_text()
    assert left.startswith("the SSH key csghub-appliance-readiness-") and "(DELETE answered HTTP 500)" in left, left
    assert len(services.ssh_keys) == 2

    services.key_deletes_fail = False
    services.repo_creates_fail = True
    line = gate_line(tmp_path, stand_in.port, git_sshd, extra=extra)
    assert line.startswith("starting") and "HTTP 500 making the repository" in line, line
    assert list(services.ssh_keys.values()) == [(user, "the-admins-laptop", "ssh-ed25519 AAAAthe-admins-own")]
    assert leftovers.read_text() == ""


def test_the_gate_warns_of_what_the_clone_probe_left_and_starts_each_run_afresh(tmp_path: Path) -> None:
    """What a probe could not delete is in the log when the gate ends (the build's csghub step then fails on the
    file); a new run forgets an earlier run's refusals and leftovers."""
    (tmp_path / "git-refusals").write_text("2\n")
    (tmp_path / "git-leftovers").write_text("stale from an earlier run\n")
    facts = "\\n".join([*UP, *ENDPOINTS])
    left = "the SSH key k of admin (DELETE answered HTTP 500)"
    out = bash(f'sync_registries() {{ :; }}; gate_facts() {{ [[ ! -e "$GATE_GIT_REFUSALS" ]] || echo "api down"; '
               f'echo "{left}" >>"$GATE_GIT_LEFTOVERS"; printf "{facts}\\n"; }}; '
               f'readiness_gate csghub.localhost 30 {tmp_path}/ready; echo "verdict=$GATE_VERDICT"').stdout
    assert "verdict=ready" in out, out
    assert f"warning: the clone probe could not delete from CSGHub: {left}\n" in out, out
    assert (tmp_path / "git-leftovers").read_text() == f"{left}\n"


def test_no_code_jwt_or_secret_is_on_a_command_line(tmp_path: Path, stand_in: Gateway,  # noqa: F811
                                                    git_sshd: int) -> None:  # noqa: F811
    """Every curl the gate runs is recorded (a wrapper first on PATH): none has the OAuth code, the JWT, or a
    password or client secret in its argv, which any user on the node can read in ps."""
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    argv = tmp_path / "argv"
    real_curl = shutil.which("curl")
    assert real_curl is not None
    (wrappers / "curl").write_text(f'#!/bin/bash\nprintf "%s\\n" "$*" >>{argv}\nexec {real_curl} "$@"\n')
    (wrappers / "curl").chmod(0o755)
    line = gate_line(tmp_path, stand_in.port, git_sshd, extra=f"export PATH={wrappers}:$PATH;")
    assert line == "ready"
    lines = argv.read_text().splitlines()
    assert len(lines) > 5 and any("/api/login" in li for li in lines)
    secrets_ = [COPY.admin_password, COPY.registry_password, stand_in.stand_in.client_secret, "code=", "Bearer",
                "jwt="]
    assert [li for li in lines if any(s in li for s in secrets_)] == []


def test_a_password_the_admin_changed_after_a_proved_sign_in_is_no_failure(
        tmp_path: Path, stand_in: Gateway, git_sshd: int) -> None:  # noqa: F811
    """CSGHub lets the admin change the password the Secret holds: a copy where the Secret's password signed in once
    stays ready when it is refused later, and the gate stops trying it (each try counts towards Casdoor's lockout)."""
    record = tmp_path / "state" / "admin-signin"
    remember = f"GATE_SIGNIN_RECORD={record};"
    services = stand_in.stand_in
    assert gate_line(tmp_path, stand_in.port, git_sshd, extra=remember) == "ready"
    assert record.read_text().startswith("proved ") and COPY.admin_password not in record.read_text()
    assert oct(record.stat().st_mode & 0o777) == "0o600"

    services.admin_password = "changed-by-the-admin"
    assert gate_line(tmp_path, stand_in.port, git_sshd, extra=remember) == "ready"
    assert record.read_text().startswith("changed ")
    assert services.wrong_times == 1
    assert gate_line(tmp_path, stand_in.port, git_sshd, extra=remember) == "ready"
    assert services.wrong_times == 1, "the gate tried a password it knows was changed"

    # A refusal of a password never proved here is a broken copy, as before (and without a record at all).
    record.write_text("proved " + "0" * 64 + "\n")
    line = gate_line(tmp_path, stand_in.port, git_sshd, extra=remember)
    assert line.startswith("failed: the admin's sign-in through CSGHub's OAuth flow failed: the admin's password"), line


def test_a_lockout_is_waiting_then_ready_when_it_ends(tmp_path: Path, stand_in: Gateway,  # noqa: F811
                                                      git_sshd: int) -> None:  # noqa: F811
    """Five wrong passwords from anyone who reaches the port lock the admin (Casdoor's failedSigninLimit); a working
    copy is "starting" meanwhile, not "failed", and ready once the lockout ends (15 min upstream; ended here by
    shortening it, not by sleeping: a test that raced a 2 s lockout passed or failed with the machine's load)."""
    import urllib.request

    stand_in.stand_in.frozen_seconds = 600
    for _ in range(5):
        request = urllib.request.Request(
            f"http://127.0.0.1:{stand_in.port}/api/login", method="POST",
            data=json.dumps({"application": "CSGHub", "organization": "OpenCSG", "username": "root",
                             "password": "guess", "type": "login"}).encode(),
            headers={"Host": f"casdoor.csghub.localhost:{stand_in.port}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.load(answer)["msg"] == "password or code is incorrect"

    line = gate_line(tmp_path, stand_in.port, git_sshd)
    assert line.startswith("starting ("), line
    assert ("waiting for the admin's sign-in through CSGHub's OAuth flow (Casdoor has locked the admin after failed "
            "sign-ins (You have entered the wrong password or code too many times, please wait for 10 minutes") in line

    stand_in.stand_in.frozen_seconds = 0  # the lockout's time is up
    assert gate_line(tmp_path, stand_in.port, git_sshd) == "ready"


def test_a_failed_job_stays_failed_after_kubernetes_deletes_it(tmp_path: Path, stand_in: Gateway,  # noqa: F811
                                                               git_sshd: int) -> None:  # noqa: F811
    state = {**GATE_FACTS_STATE, "jobs": ["csghub/csghub-server-migrate Failed=True,"]}
    record = f"GATE_FAILED_JOBS={tmp_path}/failed-jobs;"
    first = gate_line(tmp_path, stand_in.port, git_sshd, state, record)
    assert first.startswith("failed: job csghub/csghub-server-migrate failed"), first
    gone = {**GATE_FACTS_STATE, "jobs": []}  # its ttlSecondsAfterFinished passed: Kubernetes deleted it
    assert gate_line(tmp_path, stand_in.port, git_sshd, gone, record) == first
    # Without the record (the old behaviour) the gate would call it ready.
    assert gate_line(tmp_path, stand_in.port, git_sshd, gone) == "ready"


# -- the names the gate relies on, in the real chart -------------------------------------------------


def _render(helm: Path, *sets: str) -> list[dict[str, Any]]:
    cfg = load_config(None, ["provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192", *sets], "libvirt")
    return render_chart_once(helm, generate_values(cfg))


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
    # The OAuth sign-in the gate does as the portal does: the login URL's client id and redirect URI are
    # CSGHub's application in Casdoor's seed, which signs with the certificate csghub-server checks tokens with.
    core = _named(objects, "ConfigMap", gate_constant("GATE_CORE_CONFIGMAP"))["data"]
    login_url = core["CSGHUB_PORTAL_LOGIN_URL"]
    client_id = bash(f"url_query_value client_id {shlex.quote(login_url)}").stdout
    redirect = bash(f"url_query_value redirect_uri {shlex.quote(login_url)}").stdout
    assert client_id == application["clientId"] == core["STARHUB_SERVER_CASDOOR_CLIENT_ID"]
    assert core["STARHUB_SERVER_CASDOOR_CLIENT_SECRET"] == application["clientSecret"]
    assert redirect in application["redirectUris"] and redirect.endswith("/api/v1/callback/casdoor")
    assert "authorization_code" in application["grantTypes"] and application["tokenFormat"] == "JWT"
    assert application["failedSigninLimit"] == 5  # the lockout the gate waits out
    assert application["failedSigninFrozenTime"] == 15  # minutes
    # Knative: the runner's KnativeServing, of the operator's CRD the gate asks for.
    serving = objects_of_kind(objects, "KnativeServing")
    assert serving and all(o["apiVersion"].startswith("operator.knative.dev/") for o in serving)
    cert_name = application["cert"]
    seed_cert = next(c for c in seed["certs"] if c["name"] == cert_name)["certificate"]
    certs = _named(objects, "Secret", gate_constant("GATE_CASDOOR_CERTS_SECRET"))["data"]
    assert base64.b64decode(certs["tls.crt"]).decode().strip() == seed_cert.strip()
    assert core["STARHUB_SERVER_CASDOOR_CERTIFICATE"] == "/starhub-bin/casdoor/tls.crt"
    # csghub-server's API behind the portal host's /api route.
    api = [r for r in _named(objects, "HTTPRoute", "csghub-portal")["spec"]["rules"]
           if any(m.get("path", {}).get("value") == "/api" for m in r["matches"])]
    assert api and api[0]["backendRefs"][0]["name"] == "csghub-server"
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
        "GATE_HOSTS_FILE": str(tmp_path / "hosts"), "GATE_POLL_SECONDS": "1",
        "CSGHUB_READINESS": str(tmp_path / "readiness"), **(extra_env or {}),
    }
    subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", wrapper], env=env, check=True,
                   timeout=300)
    return int((out / "rc").read_text()), (out / "out").read_text(), (out / "err").read_text(), out


MIGRATE_DONE = ["csghub/csghub-casdoor-migrate Complete=True,SuccessCriteriaMet=True,",
                "csghub/csghub-server-migrate Complete=True,", "csghub/csghub-minio-init Complete=True,"]


def test_reconfigure_deletes_finished_jobs_before_the_upgrade(tmp_path: Path) -> None:
    (tmp_path / "failed-jobs").write_text("csghub/csghub-casdoor-migrate\n")  # seen failed before
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
    assert not (tmp_path / "failed-jobs").exists()  # the Jobs run again: the gate's record of failures is gone
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
    (tmp_path / "failed-jobs").write_text("csghub/csghub-server-migrate\n")  # the gate's record of failed Jobs
    out = bash("retry_release", env={"PATH": f"{fakebin}:{os.environ['PATH']}", "FAKE_K3S_STATE": str(state),
                                     "CSGHUB_READINESS": str(tmp_path / "readiness")}).stdout
    assert not (tmp_path / "failed-jobs").exists()  # the Jobs it re-runs start afresh
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
    **COPY.cluster_state(),
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
                                       f"CSGHUB_GIT_SSH_PORT={git_sshd}\nGATE_GIT_SSH_USER={GIT_SSH_USER}\n")
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
    assert registries["configs"][f"csghub.localhost:{gateway}"]["auth"] == {
        "username": COPY.registry_user, "password": COPY.registry_password}


def test_the_registry_stand_in_takes_the_htpasswd_a_copy_makes() -> None:
    """The stand-in registry checks the bcrypt hash first boot writes (secrets.sh's bcrypt_hash, through libcrypt), as
    distribution's htpasswd check (golang.org/x/crypto/bcrypt) does: the right password passes, another does not."""
    import base64 as b64

    secrets_sh = FIRSTBOOT / "secrets.sh"
    made = subprocess.run(["bash", "-c", f'. {shlex.quote(str(secrets_sh))}; bcrypt_hash "$1"', "_", "pw-of-this-copy"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    services = COPY.stand_in()
    services.htpasswd = f"registry:{made}"

    def basic(user: str, password: str) -> str:
        return "Basic " + b64.b64encode(f"{user}:{password}".encode()).decode()

    assert services.registry_authorized(basic("registry", "pw-of-this-copy"))
    assert not services.registry_authorized(basic("registry", "another"))
    assert not services.registry_authorized(basic("docker", "pw-of-this-copy"))
    assert not services.registry_authorized(None)
