#!/usr/bin/env python3
"""A stand-in for the `k3s` binary (kubectl, ctr, crictl), for running provision/30-csghub.sh
where k3s cannot run. It answers exactly the queries that script makes, from files in
$FAKE_K3S_STATE, and records what it was asked in $FAKE_K3S_STATE/calls.log.

State files: workloads (lines "KIND NS/NAME WANTED READY_AFTER_N_POLLS"), pod_images,
template_images, release_images, httproutes, store (stored image refs), pullable (refs
`crictl pull` can fetch), pinned (refs labelled pinned); for the readiness gate and
csghub-reconfigure: jobs (the release's Jobs, lines "NS/NAME CONDITIONS" as the gate's jsonpath
prints them), secrets (lines "NAME KEY VALUE"), pod_states (the gate's pod lines), helm_failed
(failed Helm revisions, as `kubectl get -o name` prints them).

The helm-controller's Job behaves like the real one on an upgrade: once this copy's values
(csghub-appliance-instance.yaml) are there, it fails while a finished Job of the release still
exists (its pod template is immutable: Helm's upgrade is rejected), and succeeds otherwise.
"""

from __future__ import annotations

import base64
import gzip
import json
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
        key = text.split("jsonpath={.data.", 1)[1].rstrip("}")
        for line in lines("secrets"):
            name, k, value = line.split(" ", 2)
            if name == args[4] and k == key:
                print(base64.b64encode(value.encode()).decode(), end="")
                break
        else:
            return 1
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
            ready = want if polls >= int(ready_after) else "0"
            print(f"{kind} {name} {want} {ready}")
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
        pass
    elif "get secrets -l owner=helm,name=csghub,status=deployed" in text:
        manifest = "".join(f"        - image: {ref}\n" for ref in lines("release_images"))
        release = json.dumps({"name": "csghub", "manifest": manifest}).encode()
        print(base64.b64encode(base64.b64encode(gzip.compress(release))).decode(), end="")
    else:
        print(f"fake k3s: unexpected kubectl {text}", file=sys.stderr)
        return 2
    return 0


def ctr(args: list[str]) -> int:
    assert args[:2] == ["-n", "k8s.io"], args
    args = args[2:]
    if args == ["images", "ls", "-q"]:
        print("\n".join(lines("store")))
    elif args[:2] == ["images", "ls"] and args[2].startswith("name=="):
        ref = args[2][len("name=="):]
        pinned = ref in lines("pinned")
        print("REF TYPE DIGEST SIZE PLATFORMS LABELS")
        print(f"{ref} x sha256:0 1 linux/amd64 " + ("io.cri-containerd.pinned=pinned" if pinned else "-"))
    elif args[:2] == ["images", "label"]:
        with open(STATE / "pinned", "a") as f:
            f.write(args[2] + "\n")
    else:
        print(f"fake k3s: unexpected ctr {args}", file=sys.stderr)
        return 2
    return 0


def crictl(args: list[str]) -> int:
    if args[0] == "pull" and args[1] in lines("pullable"):
        with open(STATE / "store", "a") as f:
            f.write(args[1] + "\n")
        return 0
    return 1


def main() -> int:
    args = sys.argv[1:]
    with open(STATE / "calls.log", "a") as f:
        f.write(" ".join(args) + "\n")
    tool, rest = args[0], args[1:]
    return {"kubectl": kubectl, "ctr": ctr, "crictl": crictl}[tool](rest)


if __name__ == "__main__":
    sys.exit(main())
