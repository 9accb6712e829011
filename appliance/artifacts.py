"""Pinned artifacts: the host-side download cache (``invoke fetch``, ``invoke lock``).

The appliance is built from three downloads: the k3s binary, k3s's air-gap image bundle and
the CSGHub chart archive. Each has a URL built from the configured mirror, a file in the
user's cache directory, and a sha256 that comes from the version lock
(``appliance/data/versions.lock.yaml``) or, when the lock has none yet, from the checksum its
publisher ships beside it (``sha256sum-amd64.txt``; the ``digest`` in the chart repository's
``index.yaml``). Downloads resume from a ``.part`` file with an HTTP Range request, show a
progress bar, and only reach their final name once verified; a mismatch deletes the partial
file. A cached file is re-hashed, not re-downloaded: a second build makes no request at all.

:func:`fetch_artifacts` is the stage entry; with ``needed_only`` it fetches what the steps that
run declare they need (``# appliance: needs=``), never asking which step that is.
``appliance.needs`` says which cached file goes where in the guest.

The DMTF OVF schemas that ``verify-ova`` validates descriptors against are a fourth, host-only
download (:func:`fetch_ovf_schemas`): seventeen files pinned by URL and sha256 in the lock, fetched
into one cache folder that becomes visible only once every file is verified.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from appliance.config import ApplianceConfig
from appliance.digest import sha256_file
from appliance.errors import ArtifactError, DigestMismatch
from appliance.files import write_atomic
from appliance.guest import NEED_CHART, NEED_IMAGE_SET, NEED_K3S_BINARY, NEED_K3S_IMAGES
from appliance.log import human_size, log
from appliance.scripts import declared_needs

LOCK_FILE = Path(__file__).resolve().parent / "data" / "versions.lock.yaml"
GUEST_ARTIFACT_DIR = "/var/cache/csghub-appliance/artifacts"
K3S_CHECKSUM_FILE = "sha256sum-amd64.txt"
CHUNK = 1024 * 1024
TIMEOUT = 60  # seconds without progress before a connection is given up
USER_AGENT = "csghub-appliance"
K3S_GROUP = "k3s"  # the version lock's section for k3s's files, and their cache folder
# The publisher's file names in a k3s release, and the need each one serves.
K3S_FILES = {"k3s": NEED_K3S_BINARY, "k3s-airgap-images-amd64.tar.zst": NEED_K3S_IMAGES}
CHART_NAME = "csghub"  # the chart's name in its repository's index.yaml (archive: <name>-<version>.tgz)
CHART_GROUP = "csghub_chart"  # its section in the version lock

# The lock file's header is kept verbatim when `invoke lock` rewrites the data below it.
_HEADER_END = "lock_version:"


@dataclass(frozen=True)
class Artifact:
    """One pinned download."""

    name: str  # the publisher's file name, also the key in the lock
    group: str  # K3S_GROUP, CHART_GROUP or "helm": the lock section
    version: str
    url: str
    checksum_url: str  # the publisher's checksum file or chart index
    setting: str  # the config key that moves the download to a mirror
    cache_path: Path
    guest_path: str
    need: str  # the need it serves (appliance.guest.NEEDS); "" for host-only downloads
    # A bound on the download for files whose size is known to be small (the OVF schemas): a
    # hostile or broken mirror cannot fill the disk before the digest check refuses the bytes.
    max_bytes: int | None = None

    @property
    def part_path(self) -> Path:
        return self.cache_path.with_name(self.cache_path.name + ".part")

    @property
    def verified_path(self) -> Path:
        """Sidecar holding the digest the file was verified against (for unpinned artifacts)."""
        return self.cache_path.with_name(self.cache_path.name + ".sha256")


@dataclass(frozen=True)
class FetchedArtifact:
    artifact: Artifact
    sha256: str
    source: str  # where the expected digest came from
    downloaded: bool  # False: served from the cache


# -- the plan -----------------------------------------------------------------------------


def cache_dir(cfg: ApplianceConfig) -> Path:
    """``artifacts.cache_dir``, else ``$XDG_CACHE_HOME/csghub-appliance``, else ``~/.cache/...``."""
    if cfg.artifacts.cache_dir:
        return cfg.path(cfg.artifacts.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "csghub-appliance"


def planned_artifacts(cfg: ApplianceConfig) -> list[Artifact]:
    """The artifacts this configuration needs, with their URLs and cache paths."""
    root = cache_dir(cfg)
    k3s_version = cfg.k3s.version
    # GitHub release tags contain '+', which must travel as %2B in a URL path.
    k3s_folder = f"{cfg.artifacts.k3s_mirror}/{urllib.parse.quote(k3s_version, safe='')}"
    chart_version = cfg.csghub.chart_version
    chart_name = f"{CHART_NAME}-{chart_version}.tgz"
    out = [
        Artifact(
            name=name,
            group=K3S_GROUP,
            version=k3s_version,
            url=f"{k3s_folder}/{name}",
            checksum_url=f"{k3s_folder}/{K3S_CHECKSUM_FILE}",
            setting="artifacts.k3s_mirror",
            cache_path=root / K3S_GROUP / k3s_version / name,
            guest_path=f"{GUEST_ARTIFACT_DIR}/{name}",
            need=need,
        )
        for name, need in K3S_FILES.items()
    ]
    out.append(
        Artifact(
            name=chart_name,
            group=CHART_GROUP,
            version=chart_version,
            url=f"{cfg.artifacts.chart_repo}/{chart_name}",
            checksum_url=f"{cfg.artifacts.chart_repo}/index.yaml",
            setting="artifacts.chart_repo",
            cache_path=root / "charts" / chart_name,
            guest_path=f"{GUEST_ARTIFACT_DIR}/{chart_name}",
            need=NEED_CHART,
        )
    )
    return out


# What the host itself needs to provide a need, beyond the need's own files: the image set is
# computed from the chart, rendered on the build host.
_HOST_INPUTS: dict[str, frozenset[str]] = {NEED_IMAGE_SET: frozenset({NEED_CHART})}


def host_needs(needs: Collection[str]) -> frozenset[str]:
    """``needs`` and what the host needs to provide them (the chart for the image set)."""
    return frozenset(needs).union(*(_HOST_INPUTS.get(n, frozenset()) for n in needs))


def _needed(cfg: ApplianceConfig) -> list[Artifact]:
    """The downloads the steps that run need (``provision.skip`` drops the needs of the others)."""
    wanted = host_needs(declared_needs(cfg.provision.skip))
    return [a for a in planned_artifacts(cfg) if a.need in wanted]


# -- the lock -------------------------------------------------------------------------------


def read_lock(path: Path = LOCK_FILE) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ArtifactError(f"cannot read the version lock {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ArtifactError(f"the version lock {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or data.get("lock_version") != 1:
        raise ArtifactError(f"the version lock {path} is not a lock_version 1 file")
    for group in (K3S_GROUP, CHART_GROUP, "helm", "images"):
        section = data.setdefault(group, {})
        if not isinstance(section, dict):
            raise ArtifactError(f"the version lock {path}: `{group}` must be a mapping of versions")
    return data


def locked_digest(lock: dict[str, Any], artifact: Artifact) -> str | None:
    release = lock.get(artifact.group, {}).get(artifact.version) or {}
    digest = release.get(artifact.name) if isinstance(release, dict) else None
    if digest is None:
        return None
    digest = str(digest).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ArtifactError(
            f"the version lock holds a malformed sha256 for {artifact.name} {artifact.version}: {digest!r}",
            hint="a digest is 64 hex digits; set it to null and run `invoke lock` to record it again",
        )
    return digest


def write_lock(lock: dict[str, Any], path: Path = LOCK_FILE) -> None:
    """Rewrite the lock's data, keeping its comment header; atomically (temp file + rename)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        text = ""
    header = text.split(_HEADER_END, 1)[0] if _HEADER_END in text else ""
    body = yaml.safe_dump(lock, sort_keys=False, default_flow_style=False)
    write_atomic(path, header + body)


# -- helm, on the build host ---------------------------------------------------------------------
# The build renders the chart itself to compute the image set (appliance/images.py); the guest never
# runs helm (k3s's helm-controller installs the chart). Pinned like every other download.

HELM_VERSION = "v3.17.3"  # tests/chart.py and scripts/install-helm.sh use the same release
HELM_ENV = "APPLIANCE_HELM"  # a helm binary to use instead of the pinned download (development)


def helm_artifact(cfg: ApplianceConfig) -> Artifact:
    name = f"helm-{HELM_VERSION}-linux-amd64.tar.gz"
    url = f"{cfg.artifacts.helm_mirror}/{name}"
    return Artifact(
        name=name, group="helm", version=HELM_VERSION, url=url, checksum_url=url + ".sha256sum",
        setting="artifacts.helm_mirror", cache_path=cache_dir(cfg) / "helm" / HELM_VERSION / name,
        guest_path="", need="",
    )


def fetch_helm(cfg: ApplianceConfig, *, update_lock: bool = False, lock_path: Path = LOCK_FILE) -> Path:
    """The helm binary to render with: ``$APPLIANCE_HELM``, else the pinned release (fetched, verified, unpacked)."""
    explicit = os.environ.get(HELM_ENV)
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ArtifactError(f"${HELM_ENV} names {path}, which is not an executable file")
        log.warning(f"rendering with ${HELM_ENV}={path} instead of the pinned helm {HELM_VERSION}")
        return path
    lock = read_lock(lock_path)
    artifact = helm_artifact(cfg)
    fetched = _fetch_one(artifact, locked_digest(lock, artifact))
    if update_lock:
        release = lock["helm"].setdefault(HELM_VERSION, {})
        if release.get(artifact.name) != fetched.sha256:
            release[artifact.name] = fetched.sha256
            write_lock(lock, lock_path)
            log.success(f"pinned {artifact.name} in {lock_path}")
    binary = artifact.cache_path.with_name("helm")
    stamp = binary.with_name("helm.from")
    if not (binary.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == fetched.sha256):
        _unpack_helm(artifact.cache_path, binary)
        stamp.write_text(fetched.sha256 + "\n", encoding="utf-8")
    return binary


def _unpack_helm(tarball: Path, binary: Path) -> None:
    import tarfile

    member_name = "linux-amd64/helm"
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            member = tar.getmember(member_name)
            if not member.isfile():
                raise KeyError(member_name)
            source = tar.extractfile(member)
            if source is None:
                raise KeyError(member_name)
            with source:
                program = source.read()
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise ArtifactError(f"{tarball} holds no {member_name} ({exc})",
                            hint=f"delete {tarball} and run `invoke fetch` again") from None
    write_atomic(binary, program, mode=0o755)


# -- fetching ---------------------------------------------------------------------------------


def fetch_artifacts(
    cfg: ApplianceConfig, *, update_lock: bool = False, lock_path: Path = LOCK_FILE, needed_only: bool = False
) -> list[FetchedArtifact]:
    """Make every planned artifact present and verified in the cache; optionally pin the digests.

    ``needed_only`` (what ``build-ova`` wants) leaves out the artifacts of skipped steps.
    Raises ``ArtifactError`` naming the artifact, the URL and the setting to change.
    """
    lock = read_lock(lock_path)
    results: list[FetchedArtifact] = []
    with log.step("fetch artifacts"):
        artifacts = _needed(cfg) if needed_only else planned_artifacts(cfg)
        if not artifacts:
            log.info("nothing to fetch: no step that runs needs a pinned download")
        for artifact in artifacts:
            results.append(_fetch_one(artifact, locked_digest(lock, artifact)))
        if update_lock:
            changed = False
            for r in results:
                release = lock[r.artifact.group].setdefault(r.artifact.version, {})
                if release.get(r.artifact.name) != r.sha256:
                    release[r.artifact.name] = r.sha256
                    changed = True
            if changed:
                write_lock(lock, lock_path)
                log.success(f"pinned {len(results)} digests in {lock_path}")
            else:
                log.info(f"{lock_path} already pins these digests")
    return results


def _fetch_one(artifact: Artifact, pinned: str | None) -> FetchedArtifact:
    cached = artifact.cache_path
    publisher: tuple[str, str] | None = None
    if cached.is_file():
        expected, source = _cached_expectation(artifact, pinned)
        if expected is None:
            # A file placed by hand (or an old cache): check it against the publisher's checksum.
            publisher = _publisher_digest(artifact)
            expected, source = publisher
        actual = sha256_file(cached)
        if actual == expected:
            if pinned is None:
                _record_verified(artifact, actual, source)
            log.info(f"{artifact.name} {artifact.version}: cached, sha256 verified ({source})")
            return FetchedArtifact(artifact, actual, source, downloaded=False)
        log.warning(
            f"{artifact.name}: cached file {cached} does not match its digest "
            f"(expected {expected}, actual {actual}); downloading it again"
        )
        cached.unlink()
        artifact.verified_path.unlink(missing_ok=True)

    if pinned is not None:
        expected, source = pinned, "version lock"
    else:
        expected, source = publisher or _publisher_digest(artifact)
    cached.parent.mkdir(parents=True, exist_ok=True)
    _download(artifact, artifact.url)
    actual = sha256_file(artifact.part_path)
    if actual != expected:
        artifact.part_path.unlink(missing_ok=True)
        raise DigestMismatch(
            f"sha256 mismatch for {artifact.name} {artifact.version} from {artifact.url}:\n"
            f"  expected {expected} ({source})\n"
            f"  actual   {actual}\n"
            f"  the downloaded file was deleted",
            hint=f"a mirror serving different bytes? check {artifact.setting}; if the publisher re-released "
            f"the file on purpose, clear its digest in {LOCK_FILE.name} and run `invoke lock`",
        )
    os.replace(artifact.part_path, cached)
    if pinned is None:
        _record_verified(artifact, actual, source)
    log.success(f"{artifact.name} {artifact.version}: downloaded, sha256 verified ({source})")
    return FetchedArtifact(artifact, actual, source, downloaded=True)


def _record_verified(artifact: Artifact, digest: str, source: str) -> None:
    artifact.verified_path.write_text(f"{digest}  {artifact.name}  # {source}\n", encoding="utf-8")


def _cached_expectation(artifact: Artifact, pinned: str | None) -> tuple[str | None, str]:
    if pinned is not None:
        return pinned, "version lock"
    try:
        recorded = artifact.verified_path.read_text(encoding="utf-8").split()[0].lower()
    except (OSError, IndexError):
        return None, ""
    return recorded, "publisher checksum recorded at download"


def _publisher_digest(artifact: Artifact) -> tuple[str, str]:
    """The sha256 the publisher ships beside the artifact."""
    text = _get_text(artifact, artifact.checksum_url)
    where = artifact.checksum_url
    if artifact.group in (K3S_GROUP, "helm"):
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == artifact.name:
                return parts[0].lower(), f"publisher's {artifact.checksum_url.rsplit('/', 1)[-1]}"
        raise ArtifactError(
            f"{where} lists no checksum for {artifact.name}",
            hint=f"is {artifact.version} a {artifact.group} release, and is {artifact.setting} right?",
        )
    try:
        index = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ArtifactError(f"the chart index {where} is not valid YAML: {exc}") from None
    entries = (index or {}).get("entries", {}).get(CHART_NAME, []) if isinstance(index, dict) else []
    for entry in entries or []:
        if isinstance(entry, dict) and str(entry.get("version")) == artifact.version:
            digest = entry.get("digest")
            if not digest:
                break
            return str(digest).lower(), "digest in the chart repository's index.yaml"
    raise ArtifactError(
        f"the chart index {where} has no csghub {artifact.version} with a digest",
        hint="check csghub.chart_version and artifacts.chart_repo",
    )


# -- the DMTF OVF schemas (what verify-ova validates descriptors against) ---------------------------
# Seventeen small XSD files, pinned by hand in the lock's `ovf_schemas` section: a URL naming a fixed
# commit and a sha256 for each. They are downloaded into a staging folder beside their final one,
# each verified, and only then is the folder renamed into place: a folder under its final name always
# holds the whole verified set and nothing else. An interrupted or refused fetch leaves the staging
# folder (verified files and a .part) for the next run to resume from, never a usable partial set.

OVF_SCHEMA_SETS = ("ovf1", "ovf2")  # OVF 1.x and OVF 2.x envelopes, each with the schemas it imports
OVF_SCHEMA_SETTING = "artifacts.ovf_schema_mirror"
_SCHEMA_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.xsd")
_STAGING_SUFFIX = ".incomplete"


@dataclass(frozen=True)
class SchemaFile:
    """One pinned schema file: ``<set>/<name>`` in the cache folder and on a mirror."""

    set: str  # "ovf1" or "ovf2"
    name: str
    url: str  # the upstream URL the lock pins (at a fixed commit)
    sha256: str

    @property
    def rel(self) -> str:
        return f"{self.set}/{self.name}"


def ovf_schema_pins(lock: dict[str, Any], lock_path: Path = LOCK_FILE) -> list[SchemaFile]:
    """The lock's ``ovf_schemas`` section, checked: plain ``.xsd`` names, https URLs, 64-hex digests."""
    where = f"the version lock {lock_path}: ovf_schemas"
    section = lock.get("ovf_schemas")
    if not isinstance(section, dict) or sorted(section) != sorted(OVF_SCHEMA_SETS):
        raise ArtifactError(f"{where} must map exactly {' and '.join(OVF_SCHEMA_SETS)} to their files")
    pins: list[SchemaFile] = []
    for set_name in OVF_SCHEMA_SETS:
        files = section[set_name]
        if not isinstance(files, dict) or not files:
            raise ArtifactError(f"{where}.{set_name} must map file names to {{url, sha256}}")
        for name, pin in files.items():
            if not isinstance(name, str) or not _SCHEMA_FILE_NAME.fullmatch(name):
                raise ArtifactError(f"{where}.{set_name}: {str(name)[:80]!r} is not a plain .xsd file name")
            url = pin.get("url") if isinstance(pin, dict) else None
            digest = str(pin.get("sha256") or "").lower() if isinstance(pin, dict) else ""
            if not isinstance(url, str) or not url.startswith("https://") or any(c.isspace() for c in url):
                raise ArtifactError(f"{where}.{set_name}.{name}: `url` must be an https URL, not {url!r}")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ArtifactError(f"{where}.{set_name}.{name}: `sha256` must be 64 hex digits, not {digest!r}",
                                    hint="these digests are pinned by hand (docs/artifacts.md), never by "
                                    "`invoke lock`")
            pins.append(SchemaFile(set_name, name, url, digest))
        if sum(n.startswith("dsp8023_") for n in files) != 1:
            raise ArtifactError(f"{where}.{set_name} must hold exactly one envelope schema (dsp8023_*.xsd)")
    return pins


def ovf_schema_folder(cfg: ApplianceConfig, pins: list[SchemaFile]) -> Path:
    """The cache folder of exactly this set of pins (a changed pin means another folder)."""
    ident = hashlib.sha256("".join(f"{p.rel} {p.sha256}\n" for p in pins).encode()).hexdigest()[:16]
    return cache_dir(cfg) / "ovf-schemas" / ident


def _schema_url(cfg: ApplianceConfig, pin: SchemaFile) -> str:
    mirror = cfg.artifacts.ovf_schema_mirror
    return f"{mirror}/{pin.set}/{pin.name}" if mirror else pin.url


def _schema_mismatches(folder: Path, pins: list[SchemaFile]) -> list[str]:
    """What keeps ``folder`` from being exactly the pinned set (empty: it is)."""
    problems = []
    for pin in pins:
        try:
            actual = sha256_file(folder / pin.set / pin.name)
        except OSError as exc:
            problems.append(f"{pin.rel}: {exc.strerror or exc}")
            continue
        if actual != pin.sha256:
            problems.append(f"{pin.rel}: expected sha256 {pin.sha256}, got {actual}")
    expected = {pin.rel for pin in pins}
    for set_name in OVF_SCHEMA_SETS:
        try:
            names = sorted(os.listdir(folder / set_name))
        except OSError:
            continue
        problems += [f"{set_name}/{n}: not a pinned file" for n in names if f"{set_name}/{n}" not in expected]
    return problems


def cached_ovf_schemas(cfg: ApplianceConfig, *, lock_path: Path = LOCK_FILE) -> tuple[Path | None, str]:
    """The verified schema folder in the cache (every file re-hashed), or None and why not (with the fix)."""
    pins = ovf_schema_pins(read_lock(lock_path), lock_path)
    folder = ovf_schema_folder(cfg, pins)
    if not folder.is_dir():
        return None, f"the pinned DMTF OVF schemas are not in the cache ({folder}); `invoke fetch` downloads them"
    problems = _schema_mismatches(folder, pins)
    if problems:
        return None, (f"the cached OVF schemas in {folder} differ from their pins ({problems[0]}); "
                      "`invoke fetch` downloads them again")
    return folder, ""


def fetch_ovf_schemas(cfg: ApplianceConfig, *, lock_path: Path = LOCK_FILE) -> Path:
    """Make the pinned OVF schemas present and verified in the cache; return their folder (``ovf1/``, ``ovf2/``).

    Raises ``DigestMismatch`` when a file's bytes differ from its pin (file, expected and actual
    digest named) and ``ArtifactError`` when a file cannot be downloaded; either way no folder is
    made usable, and the next run resumes with the files already verified.
    """
    pins = ovf_schema_pins(read_lock(lock_path), lock_path)
    final = ovf_schema_folder(cfg, pins)
    staging = final.with_name(final.name + _STAGING_SUFFIX)
    source = cfg.artifacts.ovf_schema_mirror or "the pinned upstream URLs"
    with log.step("fetch the DMTF OVF schemas", record=False):
        if final.is_dir():
            problems = _schema_mismatches(final, pins)
            if not problems:
                log.info(f"OVF schemas: cached, {len(pins)} files sha256 verified ({final})")
                return final
            log.warning(f"the cached OVF schemas in {final} differ from their pins ({'; '.join(problems[:3])}); "
                        "fetching them again")
            if staging.exists():
                shutil.rmtree(final)
            else:
                os.replace(final, staging)  # the files that still match are kept, not downloaded again
        downloaded = sum(_fetch_schema_file(cfg, pin, staging) for pin in pins)
        expected = {pin.rel for pin in pins}
        for set_name in OVF_SCHEMA_SETS:
            for extra in (staging / set_name).iterdir():
                if f"{set_name}/{extra.name}" in expected:
                    continue
                if extra.is_dir() and not extra.is_symlink():  # nothing of ours; a stray folder
                    shutil.rmtree(extra)
                else:  # a stale .part, or a stray file
                    extra.unlink()
        problems = _schema_mismatches(staging, pins)
        if problems:  # only if something changed the folder while we worked
            raise ArtifactError(f"the OVF schemas fetched into {staging} changed while being fetched: {problems[0]}")
        try:
            os.rename(staging, final)
        except OSError:
            # Another fetch finished first: keep its folder if it is the pinned set.
            if not final.is_dir() or _schema_mismatches(final, pins):
                raise
            shutil.rmtree(staging)
        log.success(f"OVF schemas: {downloaded} of {len(pins)} files downloaded from {source}, "
                    f"every sha256 verified ({final})")
    return final


# The largest pinned schema is 56 KB; no DMTF or W3C schema file comes near this.
SCHEMA_FILE_MAX_BYTES = 1 << 20


def _fetch_schema_file(cfg: ApplianceConfig, pin: SchemaFile, staging: Path) -> bool:
    """Put ``pin`` into ``staging``, verified; True if it had to be downloaded."""
    target = staging / pin.set / pin.name
    if target.is_file():
        if sha256_file(target) == pin.sha256:
            return False
        target.unlink()
    url = _schema_url(cfg, pin)
    artifact = Artifact(name=f"OVF schema {pin.rel}", group="ovf_schemas", version=pin.set, url=url,
                        checksum_url="", setting=OVF_SCHEMA_SETTING, cache_path=target, guest_path="", need="",
                        max_bytes=SCHEMA_FILE_MAX_BYTES)
    target.parent.mkdir(parents=True, exist_ok=True)
    _download(artifact, url)
    actual = sha256_file(artifact.part_path)
    if actual != pin.sha256:
        artifact.part_path.unlink(missing_ok=True)
        mirror = cfg.artifacts.ovf_schema_mirror
        raise DigestMismatch(
            f"OVF schema {pin.rel} from {url} is not the pinned file:\n"
            f"  expected sha256 {pin.sha256}\n"
            f"  got             {actual}\n"
            f"  the download was deleted; no schema folder was made usable",
            hint=(f"{OVF_SCHEMA_SETTING}={mirror} serves other bytes: point it at an unaltered copy "
                  "(<base>/ovf1/<file>, <base>/ovf2/<file>) or leave it empty for the pinned upstream URLs")
            if mirror else "the pinned URL served other bytes (a proxy rewriting downloads?); set "
            f"{OVF_SCHEMA_SETTING} to a copy you trust",
        )
    os.replace(artifact.part_path, target)
    return True


def ensure_ovf_schemas(
    cfg: ApplianceConfig, *, fetch: bool = True, lock_path: Path = LOCK_FILE
) -> tuple[Path | None, str]:
    """The schema folder ``verify-ova`` validates with, fetched first unless ``fetch`` is False.

    ``(None, why)`` when they are not cached and cannot be fetched (offline, a mirror missing a
    file, ``--no-fetch``): the check then does not run and the report says why. A file whose bytes
    differ from its pin is an error (``DigestMismatch``): that is a mirror to fix, not a network outage.
    """
    folder, why = cached_ovf_schemas(cfg, lock_path=lock_path)
    if folder is not None:
        return folder, ""
    if not fetch:
        return None, why.replace("; `invoke fetch`", " and --no-fetch was given; `invoke fetch`", 1)
    try:
        return fetch_ovf_schemas(cfg, lock_path=lock_path), ""
    except DigestMismatch:
        raise
    except ArtifactError as exc:
        log.warning(f"the OVF schemas could not be fetched: {exc}")
        return None, (f"the pinned DMTF OVF schemas are not in the cache and could not be fetched "
                      f"({exc.message.splitlines()[0]}); run `invoke fetch` where that works, or set "
                      f"{OVF_SCHEMA_SETTING} to a copy you can reach")


# -- HTTP -----------------------------------------------------------------------------------


def _open(artifact: Artifact, url: str, headers: dict[str, str]) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            return exc  # the caller handles "range not satisfiable"
        raise ArtifactError(
            f"download of {artifact.name} failed: the server answered {exc.code} {exc.reason} for {url}",
            hint=f"is the version right, and does {artifact.setting} point at the right place?",
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        host = urllib.parse.urlsplit(url).netloc or url
        raise ArtifactError(
            f"cannot reach {host} to download {artifact.name} ({reason}); URL: {url}",
            hint=f"check the network or proxy, or set {artifact.setting} to a mirror you can reach "
            f"(e.g. --set {artifact.setting}=https://mirror.example/...), or place the verified file at "
            f"{artifact.cache_path}",
        ) from None


def _get_text(artifact: Artifact, url: str) -> str:
    response = _open(artifact, url, {})
    with response:
        data: bytes = response.read()
    return data.decode("utf-8", errors="replace")


def _download(artifact: Artifact, url: str) -> None:
    """Download into ``artifact.part_path``, resuming what is already there."""
    part = artifact.part_path
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    response = _open(artifact, url, headers)
    with response:
        status = getattr(response, "status", None) or response.getcode()
        if status == 416:
            # The .part already holds every byte the server has: let verification decide.
            log.info(f"{artifact.name}: partial download is already complete")
            return
        if status == 206 and have:
            start = _range_start(response.headers.get("Content-Range", ""))
            if start != have:
                raise ArtifactError(
                    f"download of {artifact.name}: the server resumed at byte {start}, not {have} ({url})",
                    hint=f"delete {part} to start over",
                )
            mode = "ab"
            log.info(f"{artifact.name}: resuming at {human_size(have)}")
        else:
            mode, have = "wb", 0
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        total = have + remaining if remaining is not None else None
        if remaining is not None:
            _refuse_oversize(artifact, total)
            _check_space(artifact, part.parent, remaining, total)
        # Unbuffered, so a full disk surfaces at the write that hit it, not at close.
        with open(part, mode, buffering=0) as out, log.transfer(artifact.name, total, completed=have) as advance:
            _copy(artifact, response, out, advance, total)


def _copy(
    artifact: Artifact, response: BinaryIO, out: Any, advance: Callable[[int], None], total: int | None
) -> None:
    while True:
        try:
            chunk = response.read(CHUNK)
        except (TimeoutError, ConnectionError, urllib.error.URLError, http.client.HTTPException) as exc:
            raise ArtifactError(
                f"download of {artifact.name} was interrupted ({exc}); {artifact.part_path} is kept",
                hint="run the same command again: it resumes where it stopped",
            ) from None
        if not chunk:
            # http.client returns a short body silently when the peer hangs up early.
            if total is not None and out.tell() < total:
                raise ArtifactError(
                    f"download of {artifact.name} was interrupted after {human_size(out.tell())} of "
                    f"{human_size(total)}; {artifact.part_path} is kept",
                    hint="run the same command again: it resumes where it stopped",
                )
            return
        try:
            view = memoryview(chunk)
            while view:
                view = view[out.write(view) or 0 :]
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                written = artifact.part_path.stat().st_size
                free = shutil.disk_usage(artifact.part_path.parent).free
                need = f"{human_size(total - written)} more" if total is not None else "more"
                raise ArtifactError(
                    f"disk full while downloading {artifact.name} into {artifact.part_path}: "
                    f"it needs {need} ({human_size(total) if total else 'size unknown'} in all), "
                    f"{human_size(free)} free on that file system",
                    hint="free some space or set artifacts.cache_dir to a larger disk, then run the same "
                    "command again: it resumes",
                ) from None
            raise
        _refuse_oversize(artifact, out.tell())
        advance(len(chunk))


def _refuse_oversize(artifact: Artifact, size: int | None) -> None:
    if artifact.max_bytes is None or size is None or size <= artifact.max_bytes:
        return
    artifact.part_path.unlink(missing_ok=True)
    raise ArtifactError(
        f"download of {artifact.name} from {artifact.url} is larger than it can be "
        f"({human_size(size)} or more; at most {human_size(artifact.max_bytes)}); the partial file was deleted",
        hint=f"{artifact.setting} points at a server that does not serve the pinned file",
    )


def _check_space(artifact: Artifact, directory: Path, remaining: int, total: int | None) -> None:
    free = shutil.disk_usage(directory).free
    if remaining > free:
        raise ArtifactError(
            f"not enough disk space for {artifact.name} in {directory}: it needs {human_size(remaining)} more "
            f"({human_size(total or remaining)} in all), {human_size(free)} free",
            hint="free some space or set artifacts.cache_dir to a larger disk",
        )


def _range_start(content_range: str) -> int:
    # "bytes 100-999/1000"
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1
