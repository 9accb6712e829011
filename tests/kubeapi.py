"""A small Kubernetes API server that stores objects, for running the real helm and kubectl against it.

No maintained stand-in for the API server is packaged where this project installs from (PyPI, npm, Debian: no
kube-apiserver, envtest, kwok or fake server there), and k3s cannot run here. This one serves what helm 3.17 (client-go
v0.32) and kubectl ask during ``helm install``/``helm upgrade``/``helm status`` and ``kubectl create/get/delete``, with
the shapes the real apiserver answers (k8s.io/apimachinery v0.32 ``metav1`` types; read with helm v3.17.3
``pkg/kube/client.go`` and cli-runtime v0.32.2 ``pkg/resource/query_param_verifier_v3.go``):

- discovery: ``/version``, ``/api``, ``/apis`` (the legacy, non-aggregated form client-go falls back to when the answer
  is plain ``application/json``), ``/api/v1`` and ``/apis/<group>/<version>`` resource lists;
- OpenAPI v3: the root and one document per group-version, holding for every kind a PATCH operation tagged with
  ``x-kubernetes-group-version-kind`` and the ``fieldValidation`` query parameter, which is what helm's ``Build``
  checks before it trusts the server to validate (it does not validate: see below);
- objects: create (409 ``AlreadyExists``, 404 when the namespace is missing), get, list (label selectors with ``=``,
  ``==``, ``!=``; field selector ``metadata.name``/``metadata.namespace``), replace, patch (JSON merge patch RFC 7386,
  strategic merge patch with the list merge keys of the built-in types helm's patches touch, JSON patch RFC 6902),
  delete; ``watch`` answers with an open, quiet stream that ends after a few seconds (a client re-lists);
- what the apiserver itself does to a stored object: ``uid``, ``resourceVersion``, ``creationTimestamp``,
  ``generation``; a Secret's ``stringData`` folded into base64 ``data``.

What it does not do, and only a real cluster shows: schema validation and defaulting, admission, controllers (a Job
is stored as complete at once, as if its pod had succeeded: a hook Job's own work is not done), garbage collection,
finalizers, ``resourceVersion`` conflicts. It answers for the custom resources the chart renders (Gateway API, Envoy
Gateway, Knative operator) and for k3s's own (HelmChart, HelmChartConfig, Addon) as a cluster with those CRDs installed.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

KUBE_VERSION = {"major": "1", "minor": "34", "gitVersion": "v1.34.3+k3s1", "gitCommit": "0" * 40,
                "gitTreeState": "clean", "buildDate": "2025-12-01T00:00:00Z", "goVersion": "go1.24.11",
                "compiler": "gc", "platform": "linux/amd64"}


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool = True
    custom: bool = False  # served from a CRD: helm patches it with a JSON merge patch

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = [
    Kind("", "v1", "Namespace", "namespaces", namespaced=False),
    Kind("", "v1", "Secret", "secrets"),
    Kind("", "v1", "ConfigMap", "configmaps"),
    Kind("", "v1", "Service", "services"),
    Kind("", "v1", "ServiceAccount", "serviceaccounts"),
    Kind("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    Kind("", "v1", "Pod", "pods"),
    Kind("", "v1", "Event", "events"),
    Kind("apps", "v1", "Deployment", "deployments"),
    Kind("apps", "v1", "StatefulSet", "statefulsets"),
    Kind("apps", "v1", "DaemonSet", "daemonsets"),
    Kind("batch", "v1", "Job", "jobs"),
    Kind("batch", "v1", "CronJob", "cronjobs"),
    Kind("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    Kind("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
    Kind("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", namespaced=False),
    Kind("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", namespaced=False),
    Kind("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies"),
    Kind("networking.k8s.io", "v1", "Ingress", "ingresses"),
    Kind("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Kind("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", namespaced=False),
    Kind("gateway.networking.k8s.io", "v1", "Gateway", "gateways", custom=True),
    Kind("gateway.networking.k8s.io", "v1", "GatewayClass", "gatewayclasses", namespaced=False, custom=True),
    Kind("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes", custom=True),
    Kind("gateway.networking.k8s.io", "v1alpha2", "TCPRoute", "tcproutes", custom=True),
    Kind("gateway.envoyproxy.io", "v1alpha1", "EnvoyProxy", "envoyproxies", custom=True),
    Kind("operator.knative.dev", "v1beta1", "KnativeServing", "knativeservings", custom=True),
    Kind("helm.cattle.io", "v1", "HelmChart", "helmcharts", custom=True),
    Kind("helm.cattle.io", "v1", "HelmChartConfig", "helmchartconfigs", custom=True),
    Kind("k3s.cattle.io", "v1", "Addon", "addons", custom=True),
]
BUILTIN = [k for k in KINDS if not k.custom]
BY_GVK = {(k.group_version, k.kind): k for k in KINDS}
NAMESPACE = BY_GVK[("v1", "Namespace")]
CRD = BY_GVK[("apiextensions.k8s.io/v1", "CustomResourceDefinition")]


def crd_kinds(crd: dict[str, Any]) -> list[Kind]:
    """The kinds a stored CustomResourceDefinition serves (every served version)."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    return [Kind(spec.get("group", ""), v["name"], names.get("kind", ""), names.get("plural", ""),
                 namespaced=spec.get("scope") != "Cluster", custom=True)
            for v in spec.get("versions") or [] if v.get("served", True)]


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}


def _not_found(kind: Kind, name: str) -> ApiError:
    resource = kind.plural if not kind.group else f"{kind.plural}.{kind.group}"
    return ApiError(404, "NotFound", f'{resource} "{name}" not found',
                    {"name": name, "group": kind.group, "kind": kind.plural})


# -- patches ---------------------------------------------------------------------------------------------------------

# List fields the built-in types declare with patchStrategy "merge" (k8s.io/api v0.32 struct tags), by field name:
# the key their items merge on. Other lists are replaced whole, as strategic merge patch does.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "volumes": "name",
    "imagePullSecrets": "name", "env": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
    "hostAliases": "ip", "ownerReferences": "uid", "topologySpreadConstraints": "topologyKey",
    "conditions": "type", "resourceClaims": "name",
}
PRIMITIVE_MERGE_LISTS = {"finalizers"}


def _merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports":  # ContainerPort merges on containerPort, ServicePort on port
        sample = next((i for i in items if isinstance(i, dict)), {})
        return "containerPort" if "containerPort" in sample else "port"
    return MERGE_KEYS.get(field)


def json_merge(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = json_merge(out.get(key), value)
    return out


def strategic_merge(live: Any, patch: Any) -> Any:
    """Apply a strategic merge patch (apimachinery ``strategicpatch.StrategicMergePatch``) to a map."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    out = dict(live) if isinstance(live, dict) else {}
    orders: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key == "$retainKeys" or key == "$patch":
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            out[field] = [v for v in out.get(field) or [] if v not in value]
            continue
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list):
            out[key] = _merge_list(key, out.get(key), value)
        elif isinstance(value, dict):
            merged = strategic_merge(out.get(key), value)
            if merged is None:
                out.pop(key, None)
            else:
                out[key] = merged
        else:
            out[key] = value
    for field, order in orders.items():
        if isinstance(out.get(field), list):
            out[field] = _order(field, out[field], order)
    if "$retainKeys" in patch:
        keep = set(patch["$retainKeys"])
        out = {k: v for k, v in out.items() if k in keep}
    return out


def _merge_list(field: str, live: Any, patch: list[Any]) -> list[Any]:
    live_list = list(live) if isinstance(live, list) else []
    if field in PRIMITIVE_MERGE_LISTS:
        return live_list + [v for v in patch if v not in live_list]
    key = _merge_key(field, [*patch, *live_list])
    if key is None or not all(isinstance(i, dict) for i in patch):
        return copy.deepcopy(patch)
    if any(i.get("$patch") == "replace" for i in patch):
        return [copy.deepcopy(i) for i in patch if i.get("$patch") != "replace"]
    out = [copy.deepcopy(i) for i in live_list]
    for item in patch:
        at = next((n for n, i in enumerate(out) if isinstance(i, dict) and i.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if at is not None:
                del out[at]
        elif at is None:
            out.append(strategic_merge({}, item))
        else:
            out[at] = strategic_merge(out[at], item)
    return out


def _order(field: str, items: list[Any], order: list[Any]) -> list[Any]:
    if not order:
        return items
    if not isinstance(order[0], dict):
        ranked = {v: n for n, v in enumerate(order)}
        return sorted(items, key=lambda v: ranked.get(v, len(ranked)))
    key = _merge_key(field, order) or next(iter(order[0]))
    ranked = {o.get(key): n for n, o in enumerate(order)}
    return sorted(items, key=lambda i: ranked.get(i.get(key) if isinstance(i, dict) else None, len(ranked)))


def json_patch(target: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 (add, replace, remove, test)."""
    doc = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif op["op"] == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif op["op"] == "test":
            have = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if have != op["value"]:
                raise ApiError(422, "Invalid", f"test operation failed at {op['path']}")
    return doc


# -- the store ---------------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class Store:
    """Objects by (kind, namespace, name), with the bookkeeping the apiserver does on every write."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.objects: dict[tuple[Kind, str, str], dict[str, Any]] = {}
        self._rv = itertools.count(1000)
        self.writes: list[tuple[str, str, str, str]] = []  # (verb, kind, namespace, name), for tests

    def kinds(self) -> list[Kind]:
        """The built-in kinds and those of every stored CRD: what discovery lists."""
        with self.lock:
            crds = [o for (k, _, _), o in self.objects.items() if k == CRD]
        return BUILTIN + [kind for crd in crds for kind in crd_kinds(crd)]

    def kind_at(self, group: str, version: str, plural: str) -> Kind | None:
        return next((k for k in self.kinds() if (k.group, k.version, k.plural) == (group, version, plural)), None)

    def _stamp(self, kind: Kind, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        obj["apiVersion"], obj["kind"] = kind.group_version, kind.kind
        meta = obj.setdefault("metadata", {})
        if old is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
        else:
            old_meta = old["metadata"]
            for field in ("uid", "creationTimestamp"):
                meta[field] = old_meta[field]
            changed = {k: v for k, v in obj.items() if k not in ("metadata", "status")} != \
                {k: v for k, v in old.items() if k not in ("metadata", "status")}
            meta["generation"] = old_meta.get("generation", 1) + (1 if changed else 0)
        meta["resourceVersion"] = str(next(self._rv))
        if kind.kind == "Secret" and "stringData" in obj:
            data = obj.setdefault("data", {}) or {}
            for key, value in obj.pop("stringData").items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data
        if kind.kind == "Secret":
            obj.setdefault("type", "Opaque")
        if kind == CRD:
            # Established at once (helm waits for it before it installs the chart's templates).
            obj["status"] = {"conditions": [{"type": t, "status": "True", "lastTransitionTime": _now()}
                                            for t in ("NamesAccepted", "Established")],
                             "acceptedNames": (obj.get("spec") or {}).get("names", {})}
        if kind.kind == "Job":
            # No controller runs: a Job counts as done at once (helm waits for hook Jobs to complete).
            obj["status"] = {"succeeded": 1, "startTime": _now(), "completionTime": _now(),
                             "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": _now()}]}
        return obj

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            obj = self.objects.get((kind, namespace, name))
            if obj is None:
                raise _not_found(kind, name)
            return copy.deepcopy(obj)

    def find(self, kind_name: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            for (kind, ns, n), obj in self.objects.items():
                if kind.kind == kind_name and ns == namespace and n == name:
                    return copy.deepcopy(obj)
        return None

    def list(self, kind: Kind, namespace: str | None, labels: str = "", fields: str = "") -> list[dict[str, Any]]:
        field_terms = dict(t.split("=", 1) for t in fields.replace("==", "=").split(",") if "=" in t)
        with self.lock:
            out = []
            for (k, ns, name), obj in sorted(self.objects.items(), key=lambda i: (i[0][1], i[0][2])):
                if k != kind or (namespace is not None and ns != namespace):
                    continue
                if not _selector_matches(labels, obj["metadata"].get("labels") or {}):
                    continue
                if field_terms.get("metadata.name", name) != name or field_terms.get("metadata.namespace", ns) != ns:
                    continue
                out.append(copy.deepcopy(obj))
            return out

    def create(self, kind: Kind, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", f"{kind.kind} is invalid: metadata.name: Required value")
        if kind.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                               "namespace sent on the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = ""
        with self.lock:
            if kind.namespaced and (NAMESPACE, "", namespace) not in self.objects:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
            if (kind, namespace, name) in self.objects:
                resource = kind.plural if not kind.group else f"{kind.plural}.{kind.group}"
                raise ApiError(409, "AlreadyExists", f'{resource} "{name}" already exists',
                               {"name": name, "group": kind.group, "kind": kind.plural})
            stored = self._stamp(kind, obj, None)
            self.objects[(kind, namespace, name)] = stored
            self.writes.append(("create", kind.kind, namespace, name))
            return copy.deepcopy(stored)

    def replace(self, kind: Kind, namespace: str, name: str, obj: dict[str, Any], verb: str = "update",
                ) -> dict[str, Any]:
        with self.lock:
            old = self.objects.get((kind, namespace, name))
            if old is None:
                raise _not_found(kind, name)
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            meta["name"] = name
            if kind.namespaced:
                meta["namespace"] = namespace
            template = (obj.get("spec") or {}).get("template")
            if kind.kind == "Job" and template != (old.get("spec") or {}).get("template"):
                # batch/v1 validation: a Job's pod template cannot change once it exists.
                raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template: Invalid value: '
                               '"...": field is immutable', {"name": name, "group": "batch", "kind": "Job"})
            if kind.kind == "Job" or kind == CRD:
                obj.pop("status", None)
            stored = self._stamp(kind, obj, old)
            self.objects[(kind, namespace, name)] = stored
            self.writes.append((verb, kind.kind, namespace, name))
            return copy.deepcopy(stored)

    def patch(self, kind: Kind, namespace: str, name: str, content_type: str, body: Any) -> dict[str, Any]:
        with self.lock:
            live = self.get(kind, namespace, name)
            if content_type.startswith("application/merge-patch+json"):
                patched = json_merge(live, body)
            elif content_type.startswith("application/strategic-merge-patch+json"):
                if kind.custom:
                    raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format"
                                   " - accepted media types include: application/json-patch+json, "
                                   "application/merge-patch+json, application/apply-patch+yaml")
                patched = strategic_merge(live, body)
            elif content_type.startswith("application/json-patch+json"):
                patched = json_patch(live, body)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {content_type}")
            return self.replace(kind, namespace, name, patched, verb="patch")

    def delete(self, kind: Kind, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            obj = self.objects.pop((kind, namespace, name), None)
            if obj is None:
                raise _not_found(kind, name)
            self.writes.append(("delete", kind.kind, namespace, name))
            if kind.kind == "Namespace":  # no finalizers here: its objects go with it at once
                for key in [k for k in self.objects if k[1] == name and k[0].namespaced]:
                    del self.objects[key]
            return obj


def seed_k3s(store: Store) -> None:
    """What a fresh k3s holds before any manifest: its namespaces, CoreDNS's Service (the chart looks it up), and
    the CRDs of the kinds served above (installed in a real appliance by Envoy Gateway's and the Knative
    operator's charts, which the test chart's placeholders leave out)."""
    for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
        store.create(NAMESPACE, "", {"metadata": {"name": ns}})
    store.create(BY_GVK[("v1", "Service")], "kube-system", {
        "metadata": {"name": "kube-dns", "labels": {"k8s-app": "kube-dns"}},
        "spec": {"clusterIP": "10.43.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}})
    for kind in KINDS:
        if kind.custom:
            store.create(CRD, "", {
                "metadata": {"name": f"{kind.plural}.{kind.group}"},
                "spec": {"group": kind.group, "names": {"kind": kind.kind, "plural": kind.plural},
                         "scope": "Namespaced" if kind.namespaced else "Cluster",
                         "versions": [{"name": kind.version, "served": True, "storage": True}]}})
    store.writes.clear()


# -- protobuf (helm's release storage writes its Secrets through the typed clientset, in protobuf) ----------------


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: varints as int, length-delimited as bytes."""
    i = 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while i < len(buf):
        tag = varint()
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            size = varint()
            yield number, buf[i:i + size]
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ApiError(400, "BadRequest", f"protobuf wire type {wire} is not served here")


def _text(value: int | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(values: list[int | bytes]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for entry in values:
        parts = dict(_fields(entry)) if isinstance(entry, bytes) else {}
        value = parts.get(2, b"")
        out[_text(parts.get(1, b""))] = value if isinstance(value, bytes) else b""
    return out


def _grouped(buf: bytes) -> dict[int, list[int | bytes]]:
    out: dict[int, list[int | bytes]] = {}
    for number, value in _fields(buf):
        out.setdefault(number, []).append(value)
    return out


def _object_meta(buf: bytes) -> dict[str, Any]:
    """k8s.io/apimachinery/pkg/apis/meta/v1 ObjectMeta (generated.proto field numbers)."""
    f = _grouped(buf)
    meta: dict[str, Any] = {}
    for number, field in ((1, "name"), (2, "generateName"), (3, "namespace"), (5, "uid"), (6, "resourceVersion")):
        if number in f:
            meta[field] = _text(f[number][-1])
    for number, field in ((11, "labels"), (12, "annotations")):
        if number in f:
            meta[field] = {k: v.decode() for k, v in _entries(f[number]).items()}
    if 14 in f:
        meta["finalizers"] = [_text(v) for v in f[14]]
    return meta


def decode_protobuf(raw: bytes) -> dict[str, Any]:
    """A Secret or ConfigMap in Kubernetes' protobuf envelope ("k8s\\0" + runtime.Unknown, k8s.io/api v0.32
    generated.proto field numbers); anything else is answered 415, as a server without that type would."""
    if raw[:4] != b"k8s\x00":
        raise ApiError(400, "BadRequest", "not a Kubernetes protobuf envelope")
    unknown = _grouped(raw[4:])
    type_meta = _grouped(unknown[1][0]) if 1 in unknown and isinstance(unknown[1][0], bytes) else {}
    api_version, kind = _text(type_meta.get(1, [b""])[0]), _text(type_meta.get(2, [b""])[0])
    body = unknown.get(2, [b""])[0]
    f = _grouped(body if isinstance(body, bytes) else b"")
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind,
                           "metadata": _object_meta(f[1][0]) if 1 in f and isinstance(f[1][0], bytes) else {}}
    if kind == "Secret":
        if 2 in f:
            obj["data"] = {k: base64.b64encode(v).decode() for k, v in _entries(f[2]).items()}
        if 3 in f:
            obj["type"] = _text(f[3][-1])
        if 4 in f:
            obj["stringData"] = {k: v.decode() for k, v in _entries(f[4]).items()}
        if 5 in f:
            obj["immutable"] = bool(f[5][-1])
    elif kind == "ConfigMap":
        if 2 in f:
            obj["data"] = {k: v.decode() for k, v in _entries(f[2]).items()}
        if 3 in f:
            obj["binaryData"] = {k: base64.b64encode(v).decode() for k, v in _entries(f[3]).items()}
    else:
        raise ApiError(415, "UnsupportedMediaType", f"protobuf {kind} is not served here")
    return obj


# -- HTTP --------------------------------------------------------------------------------------------------------------


def _resource_list(kinds: list[Kind], group_version: str) -> dict[str, Any]:
    resources = []
    for kind in kinds:
        if kind.group_version != group_version:
            continue
        resources.append({"name": kind.plural, "singularName": kind.kind.lower(), "namespaced": kind.namespaced,
                          "kind": kind.kind, "verbs": ["create", "delete", "deletecollection", "get", "list",
                                                       "patch", "update", "watch"]})
        resources.append({"name": f"{kind.plural}/status", "singularName": "", "namespaced": kind.namespaced,
                          "kind": kind.kind, "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def _group_list(kinds: list[Kind]) -> dict[str, Any]:
    groups: dict[str, list[str]] = {}
    for kind in kinds:
        if kind.group and kind.version not in groups.setdefault(kind.group, []):
            groups[kind.group].append(kind.version)
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
         "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}} for g, vs in groups.items()]}


def _openapi_path(group_version: str) -> str:
    return "api/v1" if group_version == "v1" else f"apis/{group_version}"


def _openapi_doc(kinds: list[Kind], group_version: str) -> dict[str, Any]:
    paths = {}
    for kind in kinds:
        if kind.group_version != group_version:
            continue
        scope = "/namespaces/{namespace}" if kind.namespaced else ""
        paths[f"/{_openapi_path(group_version)}{scope}/{kind.plural}/{{name}}"] = {"patch": {
            "operationId": f"patch{kind.kind}",
            "x-kubernetes-group-version-kind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"},
                            "description": "fieldValidation instructs the server on how to handle objects in the "
                                           "request containing unknown or duplicate fields."}],
            "responses": {"200": {"description": "OK"}}}}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": KUBE_VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": {}}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes: without this, Nagle's algorithm and the client's delayed ACK add
        # 40 ms to every answer.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:
        self.server.log.append(f"{self.command} {self.path}")

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Type", "").startswith("application/vnd.kubernetes.protobuf"):
            return decode_protobuf(raw)
        return json.loads(raw) if raw else {}

    def _route(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        try:
            if self.command == "GET" and self._discovery(parts):
                return
            self._objects(parts, query)
        except ApiError as exc:
            self._send(exc.code, exc.status())

    def _discovery(self, parts: list[str]) -> bool:
        kinds = self.server.store.kinds()
        if parts == ["version"]:
            self._send(200, KUBE_VERSION)
        elif parts == ["api"]:
            self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.server.server_address[1]}"}]})
        elif parts == ["apis"]:
            self._send(200, _group_list(kinds))
        elif parts == ["api", "v1"]:
            self._send(200, _resource_list(kinds, "v1"))
        elif len(parts) == 3 and parts[0] == "apis":
            if not any(k.group_version == f"{parts[1]}/{parts[2]}" for k in kinds):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            self._send(200, _resource_list(kinds, f"{parts[1]}/{parts[2]}"))
        elif parts[:2] == ["openapi", "v3"] and len(parts) == 2:
            versions = sorted({k.group_version for k in kinds})
            self._send(200, {"paths": {_openapi_path(gv): {"serverRelativeURL": f"/openapi/v3/{_openapi_path(gv)}"
                                                           f"?hash={abs(hash(gv)):X}"} for gv in versions}})
        elif parts[:2] == ["openapi", "v3"]:
            rest = parts[2:]
            gv = "v1" if rest == ["api", "v1"] else "/".join(rest[1:]) if rest and rest[0] == "apis" else ""
            if not any(k.group_version == gv for k in kinds):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            self._send(200, _openapi_doc(kinds, gv))
        else:
            return False
        return True

    def _objects(self, parts: list[str], query: dict[str, str]) -> None:
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        found = self.server.store.kind_at(group, version, rest[0]) if rest else None
        if found is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        kind = found
        name = rest[1] if len(rest) >= 2 else None
        ns = (namespace or "") if kind.namespaced else ""
        store = self.server.store
        if self.command == "GET" and name is None:
            if query.get("watch") in ("true", "1"):
                self._quiet_watch(query)
                return
            items = store.list(kind, namespace if kind.namespaced else None, query.get("labelSelector", ""),
                               query.get("fieldSelector", ""))
            self._send(200, {"kind": f"{kind.kind}List", "apiVersion": kind.group_version,
                             "metadata": {"resourceVersion": str(next(store._rv))}, "items": items})
        elif self.command == "GET":
            self._send(200, store.get(kind, ns, name or ""))
        elif self.command == "POST" and name is None:
            if query.get("dryRun"):
                raise ApiError(400, "BadRequest", "dry run is not served here")
            self._send(201, store.create(kind, ns, self._body()))
        elif self.command == "PUT" and name:
            self._send(200, store.replace(kind, ns, name, self._body()))
        elif self.command == "PATCH" and name:
            self._send(200, store.patch(kind, ns, name, self.headers.get("Content-Type", ""), self._body()))
        elif self.command == "DELETE" and name:
            self._body()
            obj = store.delete(kind, ns, name)
            self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                             "details": {"name": name, "group": kind.group, "kind": kind.plural,
                                         "uid": obj["metadata"]["uid"]}})
        else:
            raise ApiError(405, "MethodNotAllowed", f"{self.command} is not supported on this path")

    def _quiet_watch(self, query: dict[str, str]) -> None:
        """An open watch with no events, ended after a few seconds (clients then list and watch again)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        deadline = time.monotonic() + min(float(query.get("timeoutSeconds") or 3), 3.0)
        while time.monotonic() < deadline and not self.server.stopping.is_set():
            time.sleep(0.1)
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _route


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: Store) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.store = store
        self.log: list[str] = []
        self.stopping = threading.Event()


class KubeApi:
    """A running server on loopback and a kubeconfig that points at it (plain HTTP; helm and kubectl accept it)."""

    def __init__(self, workdir: Path) -> None:
        self.store = Store()
        seed_k3s(self.store)
        self._server = _Server(self.store)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
        self.kubeconfig.chmod(0o600)

    def __enter__(self) -> KubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def requests(self) -> list[str]:
        return self._server.log

    def objects(self) -> Iterator[dict[str, Any]]:
        with self.store.lock:
            return iter([copy.deepcopy(o) for o in self.store.objects.values()])
