"""The image set: every container image an offline appliance must hold, computed once, on the build host.

One function decides it (:func:`image_set`), and everything else uses its answer: the build uploads it
as ``images.txt`` beside the manifests (:func:`write_image_list`), ``provision/30-csghub.sh`` pulls,
checks and pins exactly that list and fails on drift, and the tests compare it with the real chart.

- **Rendered images** (:func:`rendered_images`): the chart is rendered with the values the build
  installs (``helm template``, real helm, ``--kube-version`` of the pinned k3s and ``--api-versions`` of
  the CRDs the cluster gets), and the rendered objects are walked structurally: every container, init
  container and ephemeral container of every pod spec (Deployment, StatefulSet, DaemonSet, ReplicaSet,
  Job, CronJob's job template, Pod, and pod templates nested in custom resources), plus the image fields
  of the custom resources the chart creates (EnvoyProxy, KnativeServing registry overrides, Knative's
  caching Image). Text is never grepped: a CSS ``background-image: url(...)`` is not an image.
- **Runtime images** (``appliance/data/images.yaml``): images that operators and CSGHub's services start
  later, each with where it comes from (a rendered ConfigMap's key, or a project's default at the
  version the chart pins).
- **Names** (:func:`normalize_image`) follow containerd's CRI rules exactly, so that a name in the list
  is the name ``ctr -n k8s.io images ls -q`` shows once the image is stored (checked against a real
  containerd in ``tests/unit/test_images_containerd.py``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from appliance.config import ApplianceConfig
from appliance.errors import ApplianceError
from appliance.files import write_atomic

if TYPE_CHECKING:
    from appliance.ssh import RemoteSession

DATA_FILE = Path(__file__).resolve().parent / "data" / "images.yaml"
GUEST_IMAGE_LIST = "/var/cache/csghub-appliance/manifests/images.txt"

# The API groups the cluster will serve when the chart is installed: k3s's own, plus the CRDs the
# chart's subcharts bring (Gateway API and Envoy Gateway, Knative operator, Argo, LWS). Passing
# them makes `helm template` render what `helm install` on that cluster renders.
CLUSTER_API_VERSIONS = (
    "helm.cattle.io/v1",
    "k3s.cattle.io/v1",
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1alpha2",
    "gateway.envoyproxy.io/v1alpha1",
    "operator.knative.dev/v1beta1",
    "serving.knative.dev/v1",
    "argoproj.io/v1alpha1",
    "leaderworkerset.x-k8s.io/v1",
    "monitoring.coreos.com/v1",
)

_POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


class ImageError(ApplianceError, ValueError):
    """An image reference or the image declaration is not what the appliance can use."""


# -- names as containerd stores them ---------------------------------------------------------------

_DOMAIN_DEFAULT = "docker.io"
_OFFICIAL_PREFIX = "library/"
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_DOMAIN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$"
)


def normalize_image(ref: str) -> str:
    """The name containerd's CRI gives ``ref`` in its store (``docker.ParseDockerRef``).

    ``busybox`` -> ``docker.io/library/busybox:latest``; ``docker.io/redis:7`` ->
    ``docker.io/library/redis:7``; ``opencsghq/x:v1`` -> ``docker.io/opencsghq/x:v1``; a name with a tag
    *and* a digest keeps only the digest (``name:tag@sha256:..`` -> ``docker.io/library/name@sha256:..``);
    a name without tag or digest gets ``:latest``. The first path component is a registry only if it
    has a ``.`` or a ``:`` or is ``localhost``. Raises :class:`ImageError` for anything that is not a
    valid reference, and for an upper-case first component without ``.``/``:`` (containerd 1.6 refuses
    it, newer releases take it for a registry).
    """
    if not isinstance(ref, str) or not ref or ref != ref.strip() or any(c.isspace() for c in ref):
        raise ImageError(f"not an image reference: {ref!r}")
    name, _, digest = ref.partition("@")
    if digest and not _DIGEST.match(digest):
        raise ImageError(f"image reference {ref!r}: {digest!r} is not a digest (algorithm:hex)")
    tag = ""
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.match(tag):
            raise ImageError(f"image reference {ref!r}: {tag!r} is not a valid tag")
    first, sep, rest = name.partition("/")
    if sep and first.lower() != first and "." not in first and ":" not in first:
        # containerd 1.6 calls this an invalid repository, newer ones a registry host: refuse it.
        raise ImageError(f"image reference {ref!r}: {first!r} is neither a registry host (no '.' or ':') nor a "
                         "valid repository (upper case); containerd versions disagree on it")
    if sep and (("." in first or ":" in first) or first == "localhost"):
        domain, path = first, rest
        if not _DOMAIN.match(domain):
            raise ImageError(f"image reference {ref!r}: {domain!r} is not a registry host")
    else:
        domain, path = _DOMAIN_DEFAULT, name
    if domain == "index.docker.io":
        domain = _DOMAIN_DEFAULT
    if domain == _DOMAIN_DEFAULT and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    if not path or not all(_PATH_COMPONENT.match(part) for part in path.split("/")):
        raise ImageError(
            f"image reference {ref!r}: the repository {path!r} is not valid "
            "(lower-case letters, digits and . _ - separators)"
        )
    full = f"{domain}/{path}"
    if digest:
        return f"{full}@{digest}"  # the CRI drops a tag that comes with a digest
    return f"{full}:{tag or 'latest'}"


# -- images in rendered objects ---------------------------------------------------------------------


def _dig(obj: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind')} {ns + '/' if ns else ''}{meta.get('name')}"


def _pod_spec_images(spec: Any, where: str) -> Iterator[tuple[str, str]]:
    if not isinstance(spec, Mapping):
        return
    for field_name in _CONTAINER_LISTS:
        for container in spec.get(field_name) or []:
            if isinstance(container, Mapping) and container.get("image"):
                yield str(container["image"]), f"{where} {field_name}[{container.get('name', '?')}]"


def _nested_pod_specs(node: Any, path: str) -> Iterator[tuple[Any, str]]:
    """Pod specs inside a custom resource: any mapping with a ``containers`` list of named containers."""
    if isinstance(node, Mapping):
        containers = node.get("containers")
        if isinstance(containers, list) and containers and all(
            isinstance(c, Mapping) and "name" in c for c in containers
        ):
            yield node, path
            return
        for key, value in node.items():
            yield from _nested_pod_specs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _nested_pod_specs(value, f"{path}[{i}]")


def _custom_resource_images(obj: Mapping[str, Any], where: str) -> Iterator[tuple[str, str]]:
    kind = obj.get("kind")
    if kind == "EnvoyProxy":
        kubernetes = _dig(obj, ("spec", "provider", "kubernetes")) or {}
        for part in ("envoyDeployment", "envoyDaemonSet"):
            image = _dig(kubernetes, (part, "container", "image"))
            if image:
                yield str(image), f"{where} spec.provider.kubernetes.{part}.container.image"
    elif kind in ("KnativeServing", "KnativeEventing"):
        overrides = _dig(obj, ("spec", "registry", "override")) or {}
        if isinstance(overrides, Mapping):
            for key, image in overrides.items():
                if image:
                    yield str(image), f"{where} spec.registry.override[{key}]"
    elif kind == "Image" and str(obj.get("apiVersion", "")).startswith("caching.internal.knative.dev/"):
        image = _dig(obj, ("spec", "image"))
        if image:
            yield str(image), f"{where} spec.image"
    for spec, path in _nested_pod_specs(obj.get("spec"), "spec"):
        yield from _pod_spec_images(spec, f"{where} {path}")


def rendered_images(objects: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Image reference (as written) -> where each is named, from the rendered objects' structure."""
    found: dict[str, list[str]] = {}
    for obj in objects:
        if not isinstance(obj, Mapping):
            continue
        kind = obj.get("kind")
        where = _name(obj)
        if kind in _POD_TEMPLATE_PATHS:
            pairs: Iterator[tuple[str, str]] = _pod_spec_images(_dig(obj, _POD_TEMPLATE_PATHS[str(kind)]), where)
        elif kind in ("ConfigMap", "Secret", "List") or str(obj.get("apiVersion", "")).startswith("v1"):
            continue  # core objects without pod specs; ConfigMap values are read only where declared
        else:
            pairs = _custom_resource_images(obj, where)
        for image, source in pairs:
            found.setdefault(image, []).append(source)
    return found


# -- runtime images -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageEntry:
    """One image of the set: its stored name, the references that lead to it, and where each comes from."""

    name: str
    references: tuple[str, ...]
    sources: tuple[str, ...] = field(default=())


def load_declarations(path: Path = DATA_FILE) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ImageError(f"cannot read the runtime image declarations {path}: {exc}") from None
    entries = data.get("runtime") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ImageError(f"{path}: expected a `runtime:` list of image declarations")
    for i, entry in enumerate(entries):
        where = f"{path.name}: runtime[{i}]"
        if not isinstance(entry, dict) or not entry.get("from"):
            raise ImageError(f"{where}: every entry needs a `from` saying where the image comes from")
        if ("image" in entry) == ("configmap" in entry):
            raise ImageError(f"{where}: give either `image` or `configmap` + `key`")
        if "configmap" in entry and not entry.get("key"):
            raise ImageError(f"{where}: a `configmap` entry needs the `key` that holds the image")
        if "image" in entry:
            normalize_image(str(entry["image"]))  # refuse a malformed declaration early
    return entries


def runtime_images(
    objects: Sequence[Mapping[str, Any]],
    release: str = "csghub",
    declarations: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, list[str]]:
    """Image reference -> where it comes from, for the declared runtime images this render needs."""
    decls = load_declarations() if declarations is None else declarations
    kinds = {str(o.get("kind")) for o in objects if isinstance(o, Mapping)}
    configmaps = {
        str(_dig(o, ("metadata", "name"))): (o.get("data") or {})
        for o in objects
        if isinstance(o, Mapping) and o.get("kind") == "ConfigMap"
    }
    serving_versions = {
        str(_dig(o, ("spec", "version")))
        for o in objects
        if isinstance(o, Mapping) and o.get("kind") == "KnativeServing"
    }
    found: dict[str, list[str]] = {}
    for decl in decls:
        source = str(decl["from"])
        if "configmap" in decl:
            name = str(decl["configmap"]).replace("<release>", release)
            if name not in configmaps:
                continue  # the component is off
            value = configmaps[name].get(decl["key"])
            if not value:
                raise ImageError(
                    f"the rendered ConfigMap {name} has no {decl['key']}: the chart no longer names the image "
                    f"this key held ({source})",
                    hint=f"find where the chart names it now and update {DATA_FILE}",
                )
            found.setdefault(str(value), []).append(f"ConfigMap {name} {decl['key']} ({source})")
            continue
        when_kind = decl.get("when_kind")
        if when_kind and when_kind not in kinds:
            continue
        when_configmap = decl.get("when_configmap")
        if when_configmap and str(when_configmap).replace("<release>", release) not in configmaps:
            continue
        version = decl.get("version")
        if version is not None and when_kind == "KnativeServing":
            other = sorted(v for v in serving_versions if v != str(version))
            if other:
                raise ImageError(
                    f"the chart asks for Knative Serving {', '.join(other)}, but {DATA_FILE.name} declares the "
                    f"images of {version}",
                    hint=f"take that version's images from the Knative operator's kodata and update {DATA_FILE}",
                )
        found.setdefault(str(decl["image"]), []).append(source)
    return found


# -- the subchart versions the declared images were read for ------------------------------------------


def chart_dependencies(chart: Path) -> dict[str, set[str]]:
    """Subchart name -> the versions the chart's Chart.yaml files (the chart's and its subcharts') pin.

    ``chart`` is a chart directory or a packaged archive (whose subcharts may be nested archives).
    """
    import io
    import tarfile

    found: dict[str, set[str]] = {}

    def take(text: bytes | str, where: str) -> None:
        try:
            meta = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ImageError(f"{where} is not valid YAML: {exc}") from None
        for dep in (meta or {}).get("dependencies") or [] if isinstance(meta, dict) else []:
            if isinstance(dep, dict) and dep.get("name") and dep.get("version") is not None:
                found.setdefault(str(dep["name"]), set()).add(str(dep["version"]).lstrip("v"))

    def walk_archive(tar: tarfile.TarFile, where: str) -> None:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            if member.name.endswith("/Chart.yaml") or member.name.endswith(".tgz"):
                data = tar.extractfile(member)
                if data is None:
                    continue
                with data:
                    content = data.read()
                if member.name.endswith(".tgz"):
                    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as inner:
                        walk_archive(inner, f"{where}!{member.name}")
                else:
                    take(content, f"{where}!{member.name}")

    try:
        if chart.is_dir():
            for path in sorted(chart.rglob("Chart.yaml")):
                take(path.read_bytes(), str(path))
        else:
            with tarfile.open(chart, "r:gz") as tar:
                walk_archive(tar, str(chart))
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"cannot read the chart {chart}: {exc}") from None
    return found


def check_declared_versions(chart: Path, declarations: Sequence[Mapping[str, Any]] | None = None) -> None:
    """Refuse a chart whose subchart pins differ from those the declared runtime images were read for."""
    decls = load_declarations() if declarations is None else declarations
    pinned = chart_dependencies(chart)
    problems: list[str] = []
    for decl in decls:
        wanted = decl.get("chart_dependency")
        if not wanted:
            continue
        name, _, version = str(wanted).partition(" ")
        have = pinned.get(name, set())
        if version.lstrip("v") not in have:
            problem = (f"{decl.get('image')}: declared for {name} {version}, the chart pins "
                       f"{', '.join(sorted(have)) or 'no ' + name}")
            if problem not in problems:
                problems.append(problem)
    if problems:
        raise ImageError(
            f"{DATA_FILE.name} does not match the chart's subcharts:\n  " + "\n  ".join(problems),
            hint=f"read those images again from the subcharts at the versions the chart pins and update {DATA_FILE}",
        )


def image_set(
    objects: Sequence[Mapping[str, Any]],
    release: str = "csghub",
    declarations: Sequence[Mapping[str, Any]] | None = None,
) -> list[ImageEntry]:
    """The declared image set: rendered + runtime images, by containerd name, sorted."""
    merged: dict[str, tuple[set[str], list[str]]] = {}
    for refs in (rendered_images(objects), runtime_images(objects, release, declarations)):
        for ref, sources in refs.items():
            try:
                name = normalize_image(ref)
            except ImageError as exc:
                raise ImageError(f"{exc} (named by {sources[0]})") from None
            bucket = merged.setdefault(name, (set(), []))
            bucket[0].add(ref)
            bucket[1].extend(sources)
    if not merged:
        raise ImageError("the rendered chart names no image at all: is it the CSGHub chart?")
    return [ImageEntry(name, tuple(sorted(refs)), tuple(sources)) for name, (refs, sources) in sorted(merged.items())]


def image_list_text(entries: Sequence[ImageEntry], pins: Mapping[str, str] | None = None) -> str:
    """``images.txt`` as the csghub step reads it: ``NAME`` or ``NAME DIGEST`` (pinned) per line, sorted."""
    pins = pins or {}
    return "".join(f"{e.name} {pins[e.name]}\n" if e.name in pins else f"{e.name}\n" for e in entries)


_IMAGE_LIST_LINE = re.compile(r"([\x21-\x7e]+)(?: (sha256:[0-9a-f]{64}))?")


def parse_image_list(text: str, source: str = "images.txt") -> list[tuple[str, str | None]]:
    """``images.txt`` -> ``[(NAME, DIGEST or None)]`` in file order: one ``NAME`` or ``NAME DIGEST`` per line.

    The one reading of the declared set on the build host; ``read_image_set`` in
    provision/files/csghub/lib.sh is its exact mirror on the guest (tests/unit/test_images.py feeds
    both the same lines). Blank lines are skipped; any other shape (a third field, a digest that is
    not ``sha256:`` and 64 lower-case hex digits, tabs, surrounding spaces, a character outside printable
    ASCII) or a name listed twice is refused, naming the line.
    """
    entries: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    hint = "the build host writes it (appliance/images.py): `invoke provision` writes it again"
    for number, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        match = _IMAGE_LIST_LINE.fullmatch(line)
        if not match:
            raise ImageError(f"{source} line {number} is not `NAME` or `NAME sha256:DIGEST`: {line[:200]!r}",
                             hint=hint)
        if match.group(1) in seen:
            raise ImageError(f"{source} line {number} lists {match.group(1)} a second time", hint=hint)
        seen.add(match.group(1))
        entries.append((match.group(1), match.group(2)))
    return entries


def read_image_list(path: Path) -> list[tuple[str, str | None]]:
    """:func:`parse_image_list` of the file ``path``. Bytes that are not UTF-8 reach the parser as they
    are (undecodable bytes kept as surrogates), which refuses their line by number as the guest does."""
    return parse_image_list(path.read_bytes().decode("utf-8", "surrogateescape"), str(path))


# -- rendering the chart ------------------------------------------------------------------------------


def kube_version(k3s_version: str) -> str:
    """``v1.34.3+k3s1`` -> ``v1.34.3``: the Kubernetes version helm renders for."""
    return k3s_version.split("+", 1)[0]


def helm_template(
    helm: Path,
    chart: Path,
    values: Mapping[str, Any],
    *,
    k3s_version: str,
    release: str = "csghub",
    namespace: str = "csghub",
    extra_values: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """``helm template`` the chart (directory or archive) as the cluster would install it; the objects."""
    args = [str(helm), "template", release, str(chart), "-n", namespace,
            "--kube-version", kube_version(k3s_version)]
    for api in CLUSTER_API_VERSIONS:
        args += ["--api-versions", api]
    with tempfile.TemporaryDirectory(prefix="csghub-values-") as tmp:
        for i, layer in enumerate([values, *extra_values]):
            path = Path(tmp) / f"values-{i}.yaml"
            path.write_text(yaml.safe_dump(dict(layer), sort_keys=False), encoding="utf-8")
            args += ["-f", str(path)]
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False,
                                  stdin=subprocess.DEVNULL, env={**os.environ, "LANG": "C.UTF-8"})
        except OSError as exc:
            raise ImageError(f"cannot run helm ({helm}): {exc.strerror or exc}",
                             hint="run `invoke fetch` (it downloads the pinned helm)") from None
        except subprocess.TimeoutExpired:
            raise ImageError(f"helm template {chart.name} did not finish within 300 s") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ImageError(f"helm template {chart.name} failed (exit {proc.returncode}):\n{tail}")
    try:
        docs = list(yaml.safe_load_all(proc.stdout))
    except yaml.YAMLError as exc:
        raise ImageError(f"helm template {chart.name} printed YAML that does not parse: {exc}") from None
    return [doc for doc in docs if isinstance(doc, dict)]


def write_image_list(entries: Sequence[ImageEntry], directory: Path, pins: Mapping[str, str] | None = None) -> Path:
    """Write ``images.txt`` atomically into ``directory``; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "images.txt"
    return write_atomic(path, image_list_text(entries, pins))


def write_build_image_list(cfg: ApplianceConfig, helm: Path | None = None, lock_path: Path | None = None) -> Path:
    """Render the cached chart archive with the build's values and write its image set for upload.

    ``build/manifests/images.txt``; the csghub step reads it as ``MANIFEST_DIR/images.txt``. An image
    whose digest the version lock pins carries it: the step fails if the tag now resolves elsewhere.
    """
    from appliance.artifacts import LOCK_FILE, fetch_helm, planned_artifacts, read_lock

    lock_path = lock_path or LOCK_FILE
    from appliance.log import log
    from appliance.manifests import RELEASE_NAME, RELEASE_NAMESPACE
    from appliance.values import generate_values

    chart = next(a for a in planned_artifacts(cfg) if a.group == "csghub_chart").cache_path
    if not chart.is_file():
        raise ImageError(f"the chart archive {chart} is not in the cache", hint="run `invoke fetch` first")
    check_declared_versions(chart)
    helm = helm or fetch_helm(cfg, lock_path=lock_path)
    objects = helm_template(helm, chart, generate_values(cfg), k3s_version=cfg.k3s.version,
                            release=RELEASE_NAME, namespace=RELEASE_NAMESPACE)
    entries = image_set(objects, RELEASE_NAME)
    locked = locked_image_digests(read_lock(lock_path), cfg.csghub.chart_version)
    # The lock wins; a digest this build resolved itself (imagecache.resolve_unpinned) fills the rest.
    pins = {**build_resolved_digests(cfg), **locked}
    path = write_image_list(entries, cfg.build_dir / "manifests", pins)
    pinned = sum(1 for e in entries if e.name in locked)
    resolved = sum(1 for e in entries if e.name in pins and e.name not in locked)
    log.info(f"image set: {len(entries)} images the appliance stores offline, {pinned} with a digest pinned in the "
             f"version lock{f', {resolved} resolved by this build' if resolved else ''} ({path})")
    return path


# -- digests this build resolved itself (images the lock does not pin) ----------------------------------

BUILD_DIGESTS_FILE = "image-digests.json"
_BUILD_DIGESTS_LIMIT = 1 << 20


def build_digests_path(cfg: ApplianceConfig) -> Path:
    return cfg.build_dir / BUILD_DIGESTS_FILE


def build_resolved_digests(cfg: ApplianceConfig) -> dict[str, str]:
    """Image name -> digest this build resolved for a tag the version lock does not pin (this chart
    version), from ``build/image-digests.json``; kept so a resumed build keeps the same digests.

    The file is the build's own state, and hostile like state.json: anything but a small JSON object of
    ``{chart version: {name: "sha256:<64 hex>"}}`` is refused naming the file."""
    import json

    from appliance.inputs import read_regular

    path = build_digests_path(cfg)
    if not path.exists():
        return {}
    hint = f"delete {path}: the next `invoke fetch` or build resolves the tags again"
    try:
        raw = read_regular(path, _BUILD_DIGESTS_LIMIT)
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}", hint=hint) from None
    if len(raw) > _BUILD_DIGESTS_LIMIT:
        raise ImageError(f"{path} is larger than {_BUILD_DIGESTS_LIMIT} bytes", hint=hint)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"{path} is not valid JSON ({exc})", hint=hint) from None
    section = data.get(cfg.csghub.chart_version, {}) if isinstance(data, dict) else None
    if not isinstance(section, dict) or not all(
            isinstance(name, str) and _IMAGE_LIST_LINE.fullmatch(f"{name} {digest}") and isinstance(digest, str)
            for name, digest in section.items()):
        raise ImageError(f"{path} must map each chart version to {{image name: \"sha256:<64 hex>\"}}", hint=hint)
    return dict(section)


def record_build_resolved_digests(cfg: ApplianceConfig, digests: Mapping[str, str]) -> Path:
    """Add ``digests`` (name -> digest resolved now) to ``build/image-digests.json`` for this chart version."""
    import json

    from appliance.files import write_atomic

    path = build_digests_path(cfg)
    known = build_resolved_digests(cfg)
    try:
        whole = json.loads(path.read_bytes()) if path.exists() else {}
    except ValueError:  # pragma: no cover - build_resolved_digests refused it already
        whole = {}
    whole[cfg.csghub.chart_version] = dict(sorted({**known, **digests}.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(whole, indent=2, sort_keys=True) + "\n")


# -- digests pinned in the version lock (`invoke lock`) --------------------------------------------------


def locked_image_digests(lock: Mapping[str, Any], chart_version: str) -> dict[str, str]:
    """Image name -> digest the version lock pins for this chart version (section ``images``)."""
    section = (lock.get("images") or {}).get(chart_version) or {}
    if not isinstance(section, Mapping):
        raise ImageError(f"the version lock's images.{chart_version} must map image names to digests")
    pins: dict[str, str] = {}
    for name, digest in section.items():
        if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ImageError(f"the version lock pins a malformed digest for {name}: {digest!r}",
                             hint="a digest is sha256: and 64 hex digits; delete the line and run `invoke lock`")
        pins[str(name)] = digest
    return pins


def pin_image_digests(cfg: ApplianceConfig, stored: Sequence[Mapping[str, str]], lock_path: Path | None = None) -> int:
    """Write the digests a build recorded into the version lock; the number that changed."""
    from appliance.artifacts import LOCK_FILE, read_lock, write_lock

    path = lock_path or LOCK_FILE
    lock = read_lock(path)
    section = lock.setdefault("images", {}).setdefault(cfg.csghub.chart_version, {})
    changed = 0
    for image in stored:
        if section.get(image["name"]) != image["digest"]:
            section[image["name"]] = image["digest"]
            changed += 1
    if changed:
        lock["images"][cfg.csghub.chart_version] = dict(sorted(section.items()))
        write_lock(lock, path)
    return changed


# -- what the guest stored (read back for build-report.json) --------------------------------------------

GUEST_STORED_LIST = "/usr/local/share/csghub-appliance/images.txt"  # written by provision/30-csghub.sh
_STORED_LINE = re.compile(r"^(\S+) (sha256:[0-9a-f]{64})$")


def parse_stored_images(text: str) -> list[dict[str, str]]:
    """``NAME DIGEST`` lines (the csghub step's record) -> ``[{"name", "digest"}]``, sorted by name."""
    images: list[dict[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _STORED_LINE.match(line.strip())
        if not match:
            raise ImageError(f"{GUEST_STORED_LIST} line {number} is not `NAME sha256:DIGEST`: {line[:200]!r}")
        images.append({"name": match.group(1), "digest": match.group(2)})
    return sorted(images, key=lambda image: image["name"])


def read_stored_images(session: RemoteSession, path: str = GUEST_STORED_LIST) -> list[dict[str, str]]:
    """The images the guest's csghub step stored and pinned, each with its digest."""
    result = session.run(f"cat {shlex.quote(path)}", check=False, timeout=60)
    if not result.ok:
        raise ImageError(f"cannot read {path} on the guest (exit {result.exit_status}): "
                         f"{' '.join(result.tail(3)) or 'no output'}",
                         hint="did the csghub step run to its end? `invoke provision --only csghub`")
    return parse_stored_images(result.stdout)


def unrecorded(declared: Sequence[str], stored: Sequence[Mapping[str, str]]) -> list[str]:
    """Declared image names the guest's record lacks."""
    have = {image["name"] for image in stored}
    return [name for name in declared if name not in have]


def pin_recorded_images(cfg: ApplianceConfig, lock_path: Path | None = None) -> None:
    """``invoke lock``: pin the digests the last build recorded (``build/state.json``), if it recorded any."""
    from appliance.log import log
    from appliance.state import BuildState

    stored = BuildState.load(cfg.build_dir).images
    if not stored:
        log.info("no image digests to pin yet: a build records them (`invoke build-ova`), then run `invoke lock`")
        return
    changed = pin_image_digests(cfg, stored, lock_path)
    if changed:
        log.success(f"pinned {changed} image digest(s) of chart {cfg.csghub.chart_version} in the version lock")
    else:
        log.info(f"the version lock already pins the {len(stored)} image digests the last build recorded")


def record_stored_images(session: RemoteSession, declared_list: Path,
                         stored_path: str = GUEST_STORED_LIST) -> list[dict[str, str]]:
    """The guest's record of the images it stored, checked against the declared set the build uploaded.

    Every declared image must be in the record, and one whose digest the version lock pinned must
    carry that digest (the guest step already refused a moved tag; this catches a record left by
    an older run). Raises :class:`VerifyError` naming the images that do not match.
    """
    from appliance.errors import VerifyError

    stored = read_stored_images(session, stored_path)
    declared = read_image_list(declared_list) if declared_list.is_file() else []
    hint = "run `invoke provision --only csghub` again"
    lacking = unrecorded([name for name, _ in declared], stored)
    if lacking:
        raise VerifyError(f"the guest recorded no digest for {len(lacking)} declared image(s)", lacking, hint=hint)
    recorded = {image["name"]: image["digest"] for image in stored}
    moved = [f"{name}: recorded {recorded[name]}, pinned {digest}"
             for name, digest in declared if digest is not None and recorded[name] != digest]
    if moved:
        raise VerifyError(f"the guest recorded another digest than the version lock pins for {len(moved)} image(s)",
                          moved, hint=hint)
    return stored
