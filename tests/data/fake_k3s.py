#!/usr/bin/env python3
"""A stand-in for the `k3s` binary (kubectl, ctr, crictl), for running provision/30-csghub.sh
where k3s cannot run. It answers exactly the queries that script makes, from files in
$FAKE_K3S_STATE, and records what it was asked in $FAKE_K3S_STATE/calls.log.

State files: workloads (lines "KIND NS/NAME WANTED READY_AFTER_N_POLLS"), pod_images,
template_images, cronjob_images (image references the cluster's objects name), httproutes, store
(names in the image store), digests (NAME DIGEST of imported images), pullable (stored names
`crictl pull` can fetch), pulls (every pull attempt, written by the stand-in), pinned (names
labelled pinned). The image store follows containerd's naming (stored_name). For the readiness
gate and csghub-reconfigure: jobs (the release's Jobs, lines "NS/NAME CONDITIONS" as the gate's
jsonpath prints them), secrets (lines "NAME KEY VALUE"), pod_states (the gate's pod lines),
helm_failed (failed Helm revisions, as `kubectl get -o name` prints them), configmaps (lines "NAME KEY
VALUE"), knativeservings (lines "NS/NAME READY_STATUS"; the file's presence is the CRD's). A secret's
VALUE "base64:DATA" is served as DATA (a certificate, already encoded).

The helm-controller's Job behaves like the real one on an upgrade: once this copy's values
(csghub-appliance-instance.yaml) are there, it fails while a finished Job of the release still
exists (its pod template is immutable: Helm's upgrade is rejected), and succeeds otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

STATE = Path(os.environ["FAKE_K3S_STATE"])
MANIFESTS = Path("/var/lib/rancher/k3s/server/manifests")


def lines(name: str) -> list[str]:
    path = STATE / name
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def bump(name: str) -> int:
    path = STATE / name
    count = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(count))
    return count


def upgrade_rejected() -> bool:
    """An upgrade to this copy's values while a finished Job of the release still exists."""
    instance = (MANIFESTS / "csghub-appliance-instance.yaml").exists()
    return instance and any("Complete=True" in job or "Failed=True" in job for job in lines("jobs"))


def kubectl(args: list[str]) -> int:
    args = [a for a in args if not a.startswith("--request-timeout")]
    text = " ".join(args)
    if args[:2] == ["get", "--raw"]:
        print("ok")
    elif "configmap coredns-custom" in text:
        # The deploy controller applies the file the script placed.
        print((MANIFESTS / "coredns-custom.yaml").read_text())
    elif "rollout" in args:
        pass
    elif "get helmchart csghub" in text:
        if ".status.jobName" in text and (MANIFESTS / "csghub.yaml").exists():
            print("helm-install-csghub", end="")
    elif "get job helm-install-csghub" in text:
        if upgrade_rejected():
            print("0 " if "completionTime" in text else "0", end="")
        elif "completionTime" in text:
            print(f"1 {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}")
        elif "succeeded" in text:
            print("1", end="")
    elif "get pods -l job-name=helm-install-csghub" in text:
        print("5" if upgrade_rejected() else "0")
    elif args[:2] == ["get", "jobs"] and "app.kubernetes.io/instance=csghub" in text:
        print("\n".join(lines("jobs")))
    elif args[:1] == ["-n"] and args[2:4] == ["delete", "job"]:
        name = f"{args[1]}/{args[4]}"
        (STATE / "jobs").write_text("".join(f"{job}\n" for job in lines("jobs") if job.split()[0] != name))
    elif args[:4] == ["-n", "csghub", "get", "secret"] and "jsonpath={.data." in text:
        key = text.split("jsonpath={.data.", 1)[1].rstrip("}").replace("\\.", ".")
        for line in lines("secrets"):
            name, k, value = line.split(" ", 2)
            if name == args[4] and k == key:
                # "base64:DATA": stored as the API serves it already (a multi-line certificate).
                print(value[7:] if value.startswith("base64:") else base64.b64encode(value.encode()).decode(), end="")
                break
        else:
            return 1
    elif args[:4] == ["-n", "csghub", "get", "configmap"] and "jsonpath={.data." in text:
        # A ConfigMap's value as kubectl prints it (no encoding); a missing key prints nothing.
        key = text.split("jsonpath={.data.", 1)[1].rstrip("}").replace("\\.", ".")
        for line in lines("configmaps"):
            name, k, value = line.split(" ", 2)
            if name == args[4] and k == key:
                print(value, end="")
                break
    elif args[:3] == ["get", "crd", "knativeservings.operator.knative.dev"]:
        return 0 if (STATE / "knativeservings").exists() else 1
    elif args[:3] == ["get", "knativeservings.operator.knative.dev", "-A"]:
        print("\n".join(lines("knativeservings")))
    elif "get secret csghub-docker-credential" in text:
        return 1
    elif "get secrets -l owner=helm,name=csghub,status=failed" in text:
        print("\n".join(lines("helm_failed")))
    elif "delete secrets -l owner=helm,name=csghub,status=failed" in text:
        (STATE / "helm_failed").write_text("")
    elif "annotate --overwrite helmchart csghub" in text:
        pass
    elif args[:3] == ["get", "deployments,statefulsets", "-A"]:
        polls = bump("workload_polls")
        for line in lines("workloads"):
            kind, name, want, ready_after = line.split()
            # As the gate's jsonpath prints them; before it is ready the rollout has not begun.
            ready = want if polls >= int(ready_after) else "0"
            print(f"{kind} {name} want={want} ready={ready} gen=2 seen=2 updated={ready} total={want}")
    elif args[:3] == ["get", "daemonsets", "-A"]:
        pass
    elif "get httproutes" in text:
        print("\n".join(lines("httproutes")))
    elif args[:3] == ["get", "pods", "-A"] and "containerStatuses" in text:
        print("\n".join(lines("pod_states")))
    elif args[:3] == ["get", "pods", "-A"]:
        print("\n".join(lines("pod_images")))
    elif args[:3] == ["get", "deployments,statefulsets,daemonsets,jobs", "-A"]:
        print("\n".join(lines("template_images")))
    elif args[:3] == ["get", "cronjobs", "-A"]:
        print("\n".join(lines("cronjob_images")))
    else:
        print(f"fake k3s: unexpected kubectl {text}", file=sys.stderr)
        return 2
    return 0


def stored_name(ref: str) -> str:
    """The name containerd's CRI stores a pulled REF under (docker.ParseDockerRef); this stand-in's
    own copy of the rule, compared with a real containerd in tests/unit/test_images.py."""
    name, _, digest = ref.partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        domain, path = first, rest
    else:
        domain, path = "docker.io", name
    domain = "docker.io" if domain == "index.docker.io" else domain
    if domain == "docker.io" and "/" not in path:
        path = "library/" + path
    return f"{domain}/{path}@{digest}" if digest else f"{domain}/{path}:{tag or 'latest'}"


def fake_digest(name: str) -> str:
    """The digest of a stored image: the one its archive gave it (`ctr images import`), else made up."""
    for line in lines("digests"):
        stored, digest = line.split(" ")
        if stored == name:
            return digest
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def import_archive(path: str) -> int:
    """`ctr images import` of an OCI archive: each manifest of its index.json stored under its
    io.containerd.image.name annotation at its digest, as containerd 1.6's importer names it
    (archive/importer.go; checked against a real containerd in tests/unit/test_imagecache.py)."""
    import json
    import tarfile

    with tarfile.open(path) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.load(member)
    store = lines("store")
    with open(STATE / "store", "a") as f, open(STATE / "digests", "a") as d:
        for manifest in index["manifests"]:
            name = manifest["annotations"]["io.containerd.image.name"]
            if name not in store:
                f.write(name + "\n")
            d.write(f"{name} {manifest['digest']}\n")
    return 0


def ctr(args: list[str]) -> int:
    assert args[:2] == ["-n", "k8s.io"], args
    args = args[2:]
    if args == ["images", "ls", "-q"]:
        print("\n".join(lines("store")))
    elif args == ["images", "ls"]:
        # ctr's table; SIZE is two words ("1.0 KiB") as in the real one.
        print("REF TYPE DIGEST SIZE PLATFORMS LABELS")
        pinned = set(lines("pinned"))
        for ref in lines("store"):
            label = "io.cri-containerd.pinned=pinned" if ref in pinned else "-"
            print(f"{ref} application/vnd.oci.image.index.v1+json {fake_digest(ref)} 1.0 KiB linux/amd64 {label}")
    elif args[:2] == ["images", "ls"] and args[2].startswith("name=="):
        ref = args[2][len("name=="):]
        print("REF TYPE DIGEST SIZE PLATFORMS LABELS")
        if ref in lines("store"):
            pinned = ref in lines("pinned")
            print(f"{ref} x {fake_digest(ref)} 1.0 KiB linux/amd64 " +
                  ("io.cri-containerd.pinned=pinned" if pinned else "-"))
    elif args[:4] == ["images", "import", "--platform", "linux/amd64"] and len(args) == 5:
        return import_archive(args[4])
    elif args[:2] == ["images", "label"]:
        if args[2] not in lines("store"):
            print(f"ctr: image \"{args[2]}\": not found", file=sys.stderr)
            return 1
        with open(STATE / "pinned", "a") as f:
            f.write(args[2] + "\n")
    else:
        print(f"fake k3s: unexpected ctr {args}", file=sys.stderr)
        return 2
    return 0


def crictl(args: list[str]) -> int:
    # The "registry" holds the images named in `pullable` (by stored name); a pull stores the image
    # under the name containerd gives the reference, as the real CRI does. Every pull attempt is
    # recorded in `pulls`: the build's guest must make none.
    if args[0] == "pull":
        with open(STATE / "pulls", "a") as f:
            f.write(args[1] + "\n")
    if args[0] == "pull" and stored_name(args[1]) in lines("pullable"):
        if stored_name(args[1]) not in lines("store"):
            with open(STATE / "store", "a") as f:
                f.write(stored_name(args[1]) + "\n")
        return 0
    print(f"fake crictl: pulling {args[1:]} failed: not found", file=sys.stderr)
    return 1


def main() -> int:
    args = sys.argv[1:]
    with open(STATE / "calls.log", "a") as f:
        f.write(" ".join(args) + "\n")
    tool, rest = args[0], args[1:]
    return {"kubectl": kubectl, "ctr": ctr, "crictl": crictl}[tool](rest)


if __name__ == "__main__":
    sys.exit(main())
