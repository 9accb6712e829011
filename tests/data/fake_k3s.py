#!/usr/bin/env python3
"""A stand-in for the `k3s` binary (kubectl, ctr, crictl), for running provision/30-csghub.sh
where k3s cannot run. It answers exactly the queries that script makes, from files in
$FAKE_K3S_STATE, and records what it was asked in $FAKE_K3S_STATE/calls.log.

State files: workloads (lines "KIND NS/NAME WANTED READY_AFTER_N_POLLS"), pod_images,
template_images, release_images, httproutes, store (stored image refs), pullable (refs
`crictl pull` can fetch), pinned (refs labelled pinned).
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
        if "succeeded" in text:
            done = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            print(f"1 {done}")
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
