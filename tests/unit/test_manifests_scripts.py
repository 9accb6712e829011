"""The k3s and csghub steps at the boundaries reachable without k3s.

The pure functions of provision/30-csghub.sh (provision/files/csghub/lib.sh) run under bash
with canned input; both scripts run for real up to their input checks, which must refuse to
start (non-zero, a message naming what is missing) before they change anything. Running them
against a real k3s needs the k3s binary and images, which cannot be downloaded here: that
is the e2e test's job (tests/e2e/test_full_build.py).
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import PROJECT_ROOT, load_config
from appliance.images import helm_template, image_set
from appliance.manifests import manifest_yaml, render_manifests
from appliance.run import run
from appliance.values import generate_values
from tests.chart import CHART_DIR
from tests.csghub_stand_in import Gateway, GitlabSshd, make_copy

LIB = PROJECT_ROOT / "provision" / "files" / "csghub" / "lib.sh"
K3S_STEP = PROJECT_ROOT / "provision" / "20-k3s.sh"
CSGHUB_STEP = PROJECT_ROOT / "provision" / "30-csghub.sh"


def bash(snippet: str, stdin: str = "") -> str:
    result = run(["bash", "-c", f"set -euo pipefail; . {shlex.quote(str(LIB))}; {snippet}"],
                 input_text=stdin)
    return result.stdout


@pytest.mark.parametrize(
    ("ref", "stored"),
    [
        ("redis:7.4.9", "docker.io/library/redis:7.4.9"),
        ("opencsghq/csghub-server:v2.4.0-ce", "docker.io/opencsghq/csghub-server:v2.4.0-ce"),
        ("docker.io/envoyproxy/envoy:distroless-v1.37.0", "docker.io/envoyproxy/envoy:distroless-v1.37.0"),
        ("opencsg-registry.cn-beijing.cr.aliyuncs.com/opencsghq/postgres:15.18",
         "opencsg-registry.cn-beijing.cr.aliyuncs.com/opencsghq/postgres:15.18"),
        ("registry.local:5000/team/app", "registry.local:5000/team/app:latest"),
        ("nginx", "docker.io/library/nginx:latest"),
        ("gcr.io/x/y@sha256:" + "a" * 64, "gcr.io/x/y@sha256:" + "a" * 64),
        ("localhost/img:1", "localhost/img:1"),
        # What containerd really does (tests/unit/test_images.py checks these against a real one):
        ("docker.io/busybox:latest", "docker.io/library/busybox:latest"),
        ("name:tag@sha256:" + "b" * 64, "docker.io/library/name@sha256:" + "b" * 64),
    ],
)
def test_normalize_image(ref: str, stored: str) -> None:
    assert bash(f"normalize_image {shlex.quote(ref)}").strip() == stored


def step(script: Path, env: dict[str, str]) -> tuple[int, str]:
    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    result = run(["bash", str(script)], env={**base, **env}, check=False)
    return result.returncode, result.stderr


def test_k3s_step_refuses_missing_inputs_before_changing_anything(tmp_path: Path) -> None:
    lib = {"PROVISION_DIR": str(PROJECT_ROOT / "provision")}  # where the shared helpers are
    code, err = step(K3S_STEP, {**lib, "K3S_NODE_IP": "10.254.254.1"})
    assert code != 0 and "K3S_VERSION is required" in err
    code, err = step(K3S_STEP, {**lib, "K3S_VERSION": "v1.34.3+k3s1", "K3S_NODE_IP": "10.254.254"})
    assert code != 0 and "not an IPv4 address" in err
    code, err = step(K3S_STEP, {"K3S_VERSION": "v1.34.3+k3s1", "K3S_NODE_IP": "10.254.254.1",
                                "ARTIFACT_DIR": str(tmp_path), "PROVISION_DIR": str(PROJECT_ROOT / "provision")})
    assert code != 0 and f"missing {tmp_path}/k3s " in err and "invoke fetch" in err


def test_csghub_step_refuses_mismatched_manifests(tmp_path: Path) -> None:
    env = {"CSGHUB_CHART_VERSION": "2.4.0", "CSGHUB_DOMAIN": "csghub.localhost", "CSGHUB_HTTP_PORT": "30080",
           "K3S_NODE_IP": "10.254.254.1", "CSGHUB_GIT_SSH_PORT": "30022", "ARTIFACT_DIR": str(tmp_path),
           "MANIFEST_DIR": str(tmp_path), "PROVISION_DIR": str(PROJECT_ROOT / "provision")}
    code, err = step(CSGHUB_STEP, env)
    assert code != 0 and f"missing {tmp_path}/csghub-2.4.0.tgz" in err
    (tmp_path / "csghub-2.4.0.tgz").write_bytes(b"chart")
    # Manifests generated for another chart version than the step is told to install.
    for name, obj in render_manifests(load_config(None, ["csghub.chart_version=2.3.2"])).items():
        (tmp_path / name).write_text(manifest_yaml(obj))
    code, err = step(CSGHUB_STEP, env)
    assert code != 0 and f"missing {tmp_path}/images.txt" in err
    (tmp_path / "images.txt").write_text("docker.io/library/busybox:latest\n")
    code, err = step(CSGHUB_STEP, env)
    assert code != 0 and "manifests and CSGHUB_CHART_VERSION disagree" in err
    # The matching manifests pass that check; the step then needs k3s.
    for name, obj in render_manifests(load_config(None, [])).items():
        (tmp_path / name).write_text(manifest_yaml(obj))
    code, err = step(CSGHUB_STEP, env)
    assert code != 0 and "disagree" not in err
    assert "k3s is not installed" in err or "API server is not ready" in err


@pytest.mark.parametrize(
    ("domain", "use_top"),
    [("csghub.localhost", False), ("csghub.192.168.56.10.nip.io", False), ("hub.example.com", False),
     ("hub.example.com", True), ("a.b.example.org", False)],
)
def test_guest_coredns_manifest_equals_the_build_time_one(domain: str, use_top: bool) -> None:
    """csghub-reconfigure can regenerate coredns-custom in the guest (no Python there)."""
    sets = [f"csghub.domain={domain}", "k3s.node_ip=10.254.254.1"]
    if use_top:
        sets.append("csghub.values={global: {gateway: {external: {useTop: true}}}}")
    cfg = load_config(None, sets)
    expected = render_manifests(cfg)["coredns-custom.yaml"]
    base = bash(f"chart_base {shlex.quote(domain)} {'true' if use_top else 'false'}").strip()
    text = bash(f"coredns_custom_manifest {shlex.quote(domain)} {shlex.quote(base)} 10.254.254.1")
    assert yaml.safe_load(text) == expected


# -- the csghub step end to end, against a stand-in for k3s -------------------------------------
#
# k3s cannot run here, so tests/data/fake_k3s.py answers the script's kubectl/ctr/crictl
# queries from state files. The step runs for real otherwise: in a private mount namespace
# (tmpfs over /usr/local and /var/lib, invisible to the host) it installs the chart and the
# manifests, waits with progress, checks HTTP against a real server on loopback, imports the
# uploaded image archive, pins and lists images (pulling none), and a second run must change nothing.

FAKE_K3S = PROJECT_ROOT / "tests" / "data" / "fake_k3s.py"


ADMIN = ("root", 'pw-"of"-this\\copy')  # the copy's Casdoor admin (quotes and a backslash: JSON escaping)
REGISTRY = ("registry", "registry-pw-1")
# This copy's credentials (Secrets and ConfigMaps the k3s stand-in serves); the gateway stand-in's
# services agree with them unless a test makes one differ.
COPY = make_copy(ADMIN[1], REGISTRY[1])
# The gitlab-sshd stand-in's login user (a real sshd takes only real users; gitlab-sshd's is "git").
GIT_SSH_USER = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def stand_in() -> Iterator[Gateway]:
    """The gateway's NodePort on loopback (tests/csghub_stand_in.py): Envoy's routing, the portal,
    csghub-server's API, Casdoor and the registry, each answering as upstream does, holding COPY's credentials."""
    gw = Gateway(COPY.stand_in())
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def gateway(stand_in: Gateway) -> int:
    return stand_in.port


@pytest.fixture
def gitlab_sshd(stand_in: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitlabSshd]:
    """gitlab-sshd behind the git SSH NodePort: a real sshd that asks the stand-in's csghub-server whose key it is
    (with the internal API's JWT, signed with the secret csghub-server holds unless a test changes it) and serves
    a real ``git upload-pack`` (tests/csghub_stand_in.py)."""
    if os.geteuid() != 0 or not shutil.which("git"):
        pytest.skip("the gitlab-sshd stand-in needs root (sshd's AuthorizedKeysCommandUser) and git")
    try:
        sshd = GitlabSshd(tmp_path_factory.mktemp("gitlab-sshd"), stand_in.stand_in, stand_in.port,
                          stand_in.stand_in.gitaly_jwt_secret)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield sshd
    finally:
        sshd.stop()


@pytest.fixture
def git_sshd(gitlab_sshd: GitlabSshd) -> int:
    return gitlab_sshd.port


@pytest.fixture(scope="module")
def git_sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real OpenSSH server: the build's read-back of the image record talks to it as to the guest, and
    the tests that need a plain sshd use it."""
    import sys

    sys.path.insert(0, str(PROJECT_ROOT / "tests" / "ssh"))
    from sshd_server import make_server

    try:
        server = make_server(tmp_path_factory.mktemp("git-sshd"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


def stand_in_archive(tmp_path: Path, names: list[str]) -> tuple[Path, str]:
    """The archive the build uploads (appliance/imagecache.py's write_archive), every name a tiny real
    image; (its path, the image's digest)."""
    from appliance.imagecache import write_archive
    from tests.registry import image_blobs, write_layout

    manifest, blobs = image_blobs([{"stand-in": b"tiny\n"}])
    store = write_layout(tmp_path / "image-store", manifest, blobs)
    archive = tmp_path / "images.tar"
    write_archive(store, [(name, manifest.digest) for name in names], archive)
    return archive, manifest.digest


def csghub_step_in_namespace(tmp_path: Path, port: int, runs: int, image_list: list[str],
                             git_port: int, archive: Path | None = None) -> list[tuple[int, str, str]]:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("the csghub step run needs root and unshare(1) for a private mount namespace")
    art = tmp_path / "artifacts"
    art.mkdir()
    (art / "csghub-2.4.0.tgz").write_bytes(b"chart archive")
    for name, obj in render_manifests(load_config(None, [])).items():
        (art / name).write_text(manifest_yaml(obj))
    (art / "images.txt").write_text("".join(f"{name}\n" for name in image_list))
    out = tmp_path / "out"
    out.mkdir()
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    (fakebin / "systemctl").symlink_to(FAKE_HOST)
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "active.k3s").touch()  # k3s runs: a changed registries.yaml restarts it
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    wrapper = f"""
set -u
mount -t tmpfs tmpfs /usr/local
mount -t tmpfs tmpfs /var/lib
mkdir -p /usr/local/bin
install -m 0755 {shlex.quote(str(FAKE_K3S))} /usr/local/bin/k3s
for i in $(seq {runs}); do
    bash {shlex.quote(str(CSGHUB_STEP))} >{out}/$i.out 2>{out}/$i.err
    echo $? >{out}/$i.rc
    cp /usr/local/share/csghub-appliance/images.txt {out}/$i.images 2>/dev/null || true
done
"""
    env = {
        "PATH": os.environ["PATH"], "LANG": "C.UTF-8", "FAKE_K3S_STATE": str(tmp_path / "state"),
        "PROVISION_DIR": str(PROJECT_ROOT / "provision"), "ARTIFACT_DIR": str(art), "MANIFEST_DIR": str(art),
        "CSGHUB_CHART_VERSION": "2.4.0", "CSGHUB_DOMAIN": "csghub.localhost", "CSGHUB_HTTP_PORT": str(port),
        "K3S_NODE_IP": "127.0.0.1", "CSGHUB_POLL_SECONDS": "1", "CSGHUB_GIT_SSH_PORT": str(git_port),
        "GATE_GIT_SSH_USER": GIT_SSH_USER,
        # The gate's files, kept out of the host's /etc and /run.
        "CSGHUB_READINESS": str(tmp_path / "readiness"), "K3S_REGISTRIES": str(tmp_path / "registries.yaml"),
        "GATE_HOSTS_FILE": str(tmp_path / "hosts"), "FAKE_HOST_STATE": str(tmp_path / "host"),
        "IMAGE_ARCHIVE": str(archive or tmp_path / "no-images.tar"),
    }
    env["PATH"] = f"{fakebin}:{env['PATH']}"
    run(["unshare", "--mount", "--propagation", "private", "bash", "-c", wrapper], env=env, timeout=300)
    return [
        (int((out / f"{i}.rc").read_text()), (out / f"{i}.out").read_text(), (out / f"{i}.err").read_text())
        for i in range(1, runs + 1)
    ]


def fake_state(tmp_path: Path, **files: list[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    for name, content in files.items():
        (state / name).write_text("".join(f"{line}\n" for line in content))


GATE_STATE = {
    "jobs": ["csghub/csghub-server-migrate Complete=True,SuccessCriteriaMet=True,",
             "csghub/csghub-casdoor-migrate Complete=True,", "csghub/csghub-minio-init Complete=True,"],
    **COPY.cluster_state(),
}
@pytest.fixture(scope="module")
def real_image_set(helm_bin: Path) -> list[str]:
    """The image set of the real chart rendered with `invoke values`' values (what the build uploads)."""
    cfg = load_config(None, ["provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192"], "libvirt")
    objects = helm_template(helm_bin, CHART_DIR, generate_values(cfg), k3s_version=cfg.k3s.version)
    return [entry.name for entry in image_set(objects)]


def test_csghub_step_runs_and_second_run_changes_nothing(tmp_path: Path, gateway: int, git_sshd: int,
                                                         real_image_set: list[str]) -> None:
    fake_state(
        tmp_path,
        workloads=["Deployment csghub/csghub-portal 1 1", "StatefulSet csghub/csghub-postgresql 1 2"],
        httproutes=["csghub.localhost", "casdoor.csghub.localhost", "*.csghub.csghub.localhost"],
        # What the live objects name, written as the chart writes them.
        pod_images=["docker.io/opencsghq/csghub-portal:v2.4.0-ce", "docker.io/busybox:latest"],
        template_images=["docker.io/opencsghq/postgres:15.18", "docker.io/redis:7.4.9"],
        cronjob_images=["opencsghq/dataflow:v2.4.0-argo"],
        store=["docker.io/opencsghq/csghub-portal:v2.4.0-ce", "docker.io/library/busybox:latest"],
        pullable=real_image_set,  # a registry the guest could reach: it must not try
        **GATE_STATE,
    )
    archive, digest = stand_in_archive(tmp_path, real_image_set)
    (rc1, out1, err1), (rc2, out2, err2) = csghub_step_in_namespace(tmp_path, gateway, 2, real_image_set, git_sshd,
                                                                    archive)
    assert rc1 == 0, out1 + err1
    assert "changed: installed /var/lib/rancher/k3s/server/static/charts/csghub-2.4.0.tgz" in out1
    assert "changed: CoreDNS resolves csghub.localhost names to 127.0.0.1" in out1
    # The gate: progress while the StatefulSet starts, then every check passed.
    # 13 checks: API, release, 3 Jobs, 2 workloads, KnativeServing, portal, csghub-server's API, the
    # admin's OAuth sign-in (held back until the workloads are ready: Casdoor locks accounts after
    # failed sign-ins), a clone over SSH (it needs the sign-in's JWT), registry with credentials.
    assert "progress: starting (10/13): waiting for statefulset csghub/csghub-postgresql" in out1
    assert "progress: ready" in out1
    assert ("ok: CSGHub is ready: jobs, workloads, Knative, portal, csghub-server's API, the admin's OAuth "
            "sign-in (and csghub-server's callback), a clone over SSH and the registry with this copy's credentials "
            "all answer") in out1
    assert (tmp_path / "readiness").read_text() == "ready\n"
    # registries.yaml with the credentials the cluster holds; k3s restarted to read it, once.
    registries = yaml.safe_load((tmp_path / "registries.yaml").read_text())
    assert registries["mirrors"] == {f"csghub.localhost:{gateway}": {"endpoint": [f"http://csghub.localhost:{gateway}"]}}
    auth = registries["configs"][f"csghub.localhost:{gateway}"]["auth"]
    assert auth == {"username": REGISTRY[0], "password": REGISTRY[1]}
    assert "127.0.0.1 csghub.localhost # csghub-appliance" in (tmp_path / "hosts").read_text()
    assert (tmp_path / "host" / "calls.log").read_text().count("systemctl restart k3s.service") == 1
    # The set comes from the uploaded archive, before the release starts; nothing is pulled.
    n = len(real_image_set)
    assert f"progress: importing {n - 2} image(s) from {archive}" in out1
    assert out1.index("changed: imported the image set") < out1.index("changed: installed /var/lib/rancher")
    assert not (tmp_path / "state" / "pulls").exists()
    assert "crictl" not in (tmp_path / "state" / "calls.log").read_text()
    assert out1.count("changed: pinned ") == n
    assert f"ok: all {n} images of the declared set are stored and pinned" in out1
    # The store now holds the set under containerd's names: the stand-in's store is checked against a
    # real containerd in tests/unit/test_images.py.
    stored = (tmp_path / "state" / "store").read_text().split()
    assert sorted(stored) == sorted(real_image_set)
    # The list the build report reads back: every image with the digest the store reports for it.
    with_digests = [line.split(" ") for line in (tmp_path / "out" / "1.images").read_text().splitlines()]
    assert [name for name, _ in with_digests] == sorted(real_image_set)
    assert all(d.startswith("sha256:") and len(d) == 71 for _, d in with_digests)
    assert all(d == digest for _, d in with_digests)  # the archive's digests (an import replaces a record)
    assert f"CSGHub: http://csghub.localhost:{gateway}/" in out1
    assert "get secret csghub-casdoor-init" in out1
    assert rc2 == 0, out2 + err2
    assert [line for line in out2.splitlines() if line.startswith("changed:")] == []
    assert "ok: /var/lib/rancher/k3s/server/manifests/csghub.yaml up to date" in out2
    assert (tmp_path / "host" / "calls.log").read_text().count("systemctl restart k3s.service") == 1


def test_csghub_step_fails_with_the_gates_line_when_the_admin_login_is_refused(
        tmp_path: Path, gateway: int, git_sshd: int) -> None:
    state = dict(GATE_STATE)
    wrong = "csghub-casdoor-init INIT_ADMIN_PASSWORD wrong"
    state["secrets"] = [*GATE_STATE["secrets"][:1], wrong, *GATE_STATE["secrets"][2:]]
    portal = ["docker.io/opencsghq/csghub-portal:v2.4.0-ce"]
    fake_state(tmp_path, workloads=["Deployment csghub/csghub-portal 1 1"],
               httproutes=["csghub.localhost", "casdoor.csghub.localhost"], store=portal, **state)
    ((rc, _out, err),) = csghub_step_in_namespace(tmp_path, gateway, 1, portal, git_sshd)
    assert rc != 0
    assert ("CSGHub is not ready: failed: the admin's sign-in through CSGHub's OAuth flow failed: the admin's "
            "password (Secret csghub-casdoor-init) was refused: password or code is incorrect"
            " — sudo k3s kubectl -n csghub logs deploy/csghub-casdoor; then re-run the build") in err



def test_csghub_step_fails_naming_a_missing_image(tmp_path: Path, gateway: int, git_sshd: int,
                                                real_image_set: list[str]) -> None:
    unavailable = "docker.io/opencsghq/kaniko-executor:v1.24.0"
    assert unavailable in real_image_set
    fake_state(
        tmp_path,
        workloads=["Deployment csghub/csghub-portal 1 1"],
        httproutes=["csghub.localhost", "casdoor.csghub.localhost"],
        pod_images=["opencsghq/csghub-portal:v2.4.0-ce"],
        pullable=real_image_set,  # reachable, yet never asked
        **GATE_STATE,
    )
    archive, _ = stand_in_archive(tmp_path, [name for name in real_image_set if name != unavailable])
    ((rc, out, err),) = csghub_step_in_namespace(tmp_path, gateway, 1, real_image_set, git_sshd, archive)
    assert rc != 0
    assert not (tmp_path / "state" / "pulls").exists()
    assert f"the guest never pulls):\n  {unavailable}\n" in err
    assert f"1 of {len(real_image_set)} images of the declared set are not in the image store" in err
    assert "ok: all" not in out
    assert "changed: installed /var/lib/rancher" not in out  # before the release starts


def test_csghub_step_fails_on_an_image_the_set_does_not_declare(tmp_path: Path, gateway: int, git_sshd: int) -> None:
    declared = ["docker.io/opencsghq/csghub-portal:v2.4.0-ce"]
    fake_state(
        tmp_path,
        workloads=["Deployment csghub/csghub-portal 1 1"],
        httproutes=["csghub.localhost", "casdoor.csghub.localhost"],
        pod_images=["opencsghq/csghub-portal:v2.4.0-ce", "docker.io/busybox:latest"],
        store=declared,
        **GATE_STATE,
    )
    ((rc, _out, err),) = csghub_step_in_namespace(tmp_path, gateway, 1, declared, git_sshd)
    assert rc != 0
    assert "images the cluster references that the declared image set lacks:" in err
    assert "  docker.io/library/busybox:latest (as docker.io/busybox:latest)" in err
    assert "the declared image set is out of date: 1 image(s)" in err


def test_csghub_step_checks_digests_the_version_lock_pins(tmp_path: Path, gateway: int, git_sshd: int) -> None:
    import hashlib

    def stand_in_digest(name: str) -> str:  # what tests/data/fake_k3s.py reports for a stored image
        return "sha256:" + hashlib.sha256(name.encode()).hexdigest()

    kept, moved = "docker.io/opencsghq/csghub-portal:v2.4.0-ce", "docker.io/library/redis:7.4.9"
    fake_state(
        tmp_path,
        workloads=["Deployment csghub/csghub-portal 1 1"],
        httproutes=["csghub.localhost", "casdoor.csghub.localhost"],
        pod_images=["opencsghq/csghub-portal:v2.4.0-ce"],
        store=[kept],
        **GATE_STATE,
    )
    archive, digest = stand_in_archive(tmp_path, [moved])
    listed = [f"{kept} {stand_in_digest(kept)}", f"{moved} sha256:{'0' * 64}"]
    ((rc, _out, err),) = csghub_step_in_namespace(tmp_path, gateway, 1, listed, git_sshd, archive)
    assert rc != 0
    assert "images whose digest differs from the one the version lock pins:" in err
    assert (f"  {moved}: stored {digest}, images.txt names sha256:{'0' * 64} "
            "(the version lock's pin or the digest this build resolved)") in err
    assert kept + ":" not in err
    assert "1 image(s) differ from the version lock" in err


def test_a_pinned_build_records_its_images_and_passes(tmp_path: Path, gateway: int, git_sshd: int,
                                                       git_sshd_server: Any) -> None:
    """`invoke lock` pinned digests for the stand-in images: images.txt carries `NAME DIGEST` lines, the
    guest step accepts them, and the build host's read-back (over a real SSH session) passes."""
    import hashlib

    from appliance.artifacts import LOCK_FILE, read_lock, write_lock
    from appliance.images import ImageEntry, image_list_text, locked_image_digests, record_stored_images

    def stand_in_digest(name: str) -> str:  # what tests/data/fake_k3s.py reports for a stored image
        return "sha256:" + hashlib.sha256(name.encode()).hexdigest()

    kept, pulled = "docker.io/opencsghq/csghub-portal:v2.4.0-ce", "docker.io/library/redis:7.4.9"
    unpinned = "docker.io/library/busybox:latest"
    archive, digest = stand_in_archive(tmp_path, [pulled, unpinned])
    lock = read_lock(LOCK_FILE)
    lock["images"] = {"2.4.0": {kept: stand_in_digest(kept), pulled: digest}}
    write_lock(lock, tmp_path / "versions.lock.yaml")
    pins = locked_image_digests(read_lock(tmp_path / "versions.lock.yaml"), "2.4.0")
    listed = image_list_text([ImageEntry(name, (name,)) for name in sorted([kept, pulled, unpinned])], pins)
    assert f"{pulled} {digest}\n" in listed and f"{unpinned}\n" in listed
    fake_state(tmp_path, workloads=["Deployment csghub/csghub-portal 1 1"],
               httproutes=["csghub.localhost", "casdoor.csghub.localhost"],
               pod_images=["opencsghq/csghub-portal:v2.4.0-ce"], store=[kept], **GATE_STATE)
    ((rc, out, err),) = csghub_step_in_namespace(tmp_path, gateway, 1, listed.splitlines(), git_sshd,
                                                 archive)
    assert rc == 0, out + err
    assert "ok: all 3 images of the declared set are stored and pinned" in out
    with git_sshd_server.session(known_hosts=tmp_path / "known_hosts") as session:
        recorded = record_stored_images(session, tmp_path / "artifacts" / "images.txt",
                                        str(tmp_path / "out" / "1.images"))
    assert recorded == [{"name": n, "digest": stand_in_digest(n) if n == kept else digest}
                        for n in sorted([kept, pulled, unpinned])]


# -- the k3s step, against stand-ins for k3s, systemd and ip ------------------------------------
#
# Same approach for provision/20-k3s.sh: overlays on /etc, /usr/local and /var/lib in a private
# mount namespace take its writes; tests/data/fake_k3s_host.py answers for k3s (the uploaded
# "binary" is the stand-in), systemctl and ip.

FAKE_HOST = PROJECT_ROOT / "tests" / "data" / "fake_k3s_host.py"
K3S_FILES = ["/etc/rancher/k3s/config.yaml", "/etc/default/k3s", "/etc/systemd/network/10-dummy-csghub.netdev",
             "/etc/systemd/network/10-dummy-csghub.network", "/etc/systemd/system/k3s.service"]


def k3s_step_in_namespace(tmp_path: Path, runs: list[dict[str, str]]) -> tuple[list[tuple[int, str, str]], Path]:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("the k3s step run needs root and unshare(1) for a private mount namespace")
    art = tmp_path / "artifacts"
    art.mkdir()
    shutil.copyfile(FAKE_HOST, art / "k3s")
    (art / "k3s-airgap-images-amd64.tar.zst").write_bytes(b"image bundle")
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    for tool in ("systemctl", "ip"):
        (fakebin / tool).symlink_to(FAKE_HOST)
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    out.mkdir()
    steps = []
    for i, overrides in enumerate(runs, 1):
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in overrides.items())
        steps.append(f"env {exports} bash {shlex.quote(str(K3S_STEP))} >{out}/{i}.out 2>{out}/{i}.err; "
                     f"echo $? >{out}/{i}.rc")
    overlays = "\n".join(
        f"mkdir -p {tmp_path}/ovl/{n}/up {tmp_path}/ovl/{n}/work && "
        f"mount -t overlay overlay -o lowerdir={d},upperdir={tmp_path}/ovl/{n}/up,workdir={tmp_path}/ovl/{n}/work {d}"
        for n, d in (("etc", "/etc"), ("usrlocal", "/usr/local"), ("varlib", "/var/lib"))
    )
    wrapper = f"""
set -eu
mkdir -p {tmp_path}/ovl && mount -t tmpfs tmpfs {tmp_path}/ovl
{overlays}
set +e
{chr(10).join(steps)}
for f in {' '.join(K3S_FILES)}; do cp "$f" {out}/ 2>/dev/null; done
readlink /usr/local/bin/kubectl >{out}/kubectl.link || true
"""
    env = {
        "PATH": f"{fakebin}:{os.environ['PATH']}", "LANG": "C.UTF-8", "FAKE_HOST_STATE": str(state),
        "FAKE_K3S_VERSION": "v1.34.3+k3s1", "PROVISION_DIR": str(PROJECT_ROOT / "provision"),
        "ARTIFACT_DIR": str(art), "K3S_VERSION": "v1.34.3+k3s1", "K3S_NODE_IP": "10.254.254.1",
        "K3S_EXTRA_ARGS": "",
    }
    run(["unshare", "--mount", "--propagation", "private", "bash", "-c", wrapper], env=env, timeout=300)
    results = [
        (int((out / f"{i}.rc").read_text()), (out / f"{i}.out").read_text(), (out / f"{i}.err").read_text())
        for i in range(1, len(runs) + 1)
    ]
    return results, out


def test_k3s_step_installs_binds_and_is_idempotent(tmp_path: Path) -> None:
    results, out = k3s_step_in_namespace(
        tmp_path, [{}, {}, {"K3S_EXTRA_ARGS": "--kubelet-arg=max-pods=200"}]
    )
    (rc1, out1, err1), (rc2, out2, err2), (rc3, out3, err3) = results
    assert rc1 == 0, out1 + err1
    assert "changed: installed /usr/local/bin/k3s" in out1
    assert "changed: installed /var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst" in out1
    assert "changed: enabled systemd-networkd" in out1
    assert "ok: dummy-csghub has 10.254.254.1" in out1
    assert "changed: starting k3s v1.34.3+k3s1" in out1
    assert "ok: node csghub Ready at 10.254.254.1" in out1
    assert "ok: kube-system/local-path-provisioner available" in out1
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["node-ip"] == config["advertise-address"] == "10.254.254.1"
    assert config["flannel-iface"] == "dummy-csghub"
    assert sorted(config["disable"]) == ["servicelb", "traefik"]
    network = (out / "10-dummy-csghub.network").read_text()
    assert "Address=10.254.254.1/24" in network and "Metric=4096" in network
    assert "Kind=dummy" in (out / "10-dummy-csghub.netdev").read_text()
    assert (out / "kubectl.link").read_text().strip() == "k3s"
    # Second run: nothing to do.
    assert rc2 == 0, out2 + err2
    assert [line for line in out2.splitlines() if line.startswith("changed:")] == []
    assert "ok: k3s.service running, nothing changed" in out2
    # Third run: a changed input restarts k3s and lands in /etc/default/k3s.
    assert rc3 == 0, out3 + err3
    assert "changed: restarting k3s" in out3
    assert "K3S_EXTRA_ARGS=--kubelet-arg=max-pods=200" in (out / "k3s").read_text()


def test_k3s_step_refuses_a_binary_of_another_version(tmp_path: Path) -> None:
    results, _ = k3s_step_in_namespace(tmp_path, [{"FAKE_K3S_VERSION": "v1.33.5+k3s1"}])
    ((rc, _out, err),) = results
    assert rc != 0
    assert "the uploaded k3s binary is v1.33.5+k3s1, the config asks for v1.34.3+k3s1" in err
