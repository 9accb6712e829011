"""The host's provider of each need a step declares (``# appliance: needs=``).

The vocabulary is ``appliance.guest.NEEDS``; a step names what it reads from the host in its
header, and this module says, for each need, which host file goes where in the guest
(:func:`need_uploads`), generating what is generated (manifests, the image list). The build
never asks which step needs what: :func:`guest_uploads` serves the needs of the steps that run.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from appliance.artifacts import planned_artifacts
from appliance.config import ApplianceConfig
from appliance.guest import NEED_CHART, NEED_IMAGE_SET, NEED_K3S_BINARY, NEED_K3S_IMAGES, NEED_MANIFESTS, NEEDS
from appliance.imagecache import image_uploads
from appliance.images import GUEST_IMAGE_LIST, write_build_image_list
from appliance.manifests import write_manifests
from appliance.scripts import declared_needs


@dataclass(frozen=True)
class GuestUpload:
    """One host file a step needs on the guest: the need it serves, the host file, the guest path."""

    need: str
    local: Path
    guest: str


def _artifact_uploads(cfg: ApplianceConfig, need: str) -> list[GuestUpload]:
    """The pinned downloads that serve ``need``, from the artifact cache."""
    return [GuestUpload(need, a.cache_path, a.guest_path) for a in planned_artifacts(cfg) if a.need == need]


def _manifest_uploads(cfg: ApplianceConfig, need: str) -> list[GuestUpload]:
    return [GuestUpload(need, local, guest) for local, guest in write_manifests(cfg)]


def _image_set_uploads(cfg: ApplianceConfig, need: str) -> list[GuestUpload]:
    """images.txt for exactly these values (computed when the chart is cached; else reported missing)
    and, when every image is pinned and cached, their archive: the guest never pulls."""
    chart_cached = all(up.local.is_file() for up in _artifact_uploads(cfg, NEED_CHART))
    if chart_cached:
        write_build_image_list(cfg)
    uploads = [GuestUpload(need, cfg.build_dir / "manifests" / "images.txt", GUEST_IMAGE_LIST)]
    if chart_cached:
        uploads += [GuestUpload(need, local, guest) for local, guest in image_uploads(cfg)]
    return uploads


# The host's provider of each need (appliance.guest.NEEDS): what it puts on the guest.
_PROVIDERS: dict[str, Callable[[ApplianceConfig, str], list[GuestUpload]]] = {
    NEED_K3S_BINARY: _artifact_uploads,
    NEED_K3S_IMAGES: _artifact_uploads,
    NEED_CHART: _artifact_uploads,
    NEED_MANIFESTS: _manifest_uploads,
    NEED_IMAGE_SET: _image_set_uploads,
}
assert set(_PROVIDERS) == set(NEEDS), "every need has exactly one host provider"


def need_uploads(cfg: ApplianceConfig, need: str) -> list[GuestUpload]:
    """The files the host provides for one need. Generated ones (manifests, images.txt) are
    written here, under ``build/manifests/``; cached downloads must be fetched first
    (``appliance.artifacts.fetch_artifacts``). A step marker hashes these files too: a changed value changes a
    manifest, not the environment."""
    return _PROVIDERS[need](cfg, need)


def guest_uploads(cfg: ApplianceConfig, needs: Collection[str] | None = None) -> list[GuestUpload]:
    """Every file the host provides for ``needs`` (default: the needs of the steps ``cfg`` runs),
    in the vocabulary's order."""
    wanted = declared_needs(cfg.provision.skip) if needs is None else needs
    return [up for need in NEEDS if need in wanted for up in need_uploads(cfg, need)]
