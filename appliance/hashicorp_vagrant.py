"""HashiCorp's own Vagrant, for hosts whose VirtualBox is newer than Debian's Vagrant drives.

Debian's ``vagrant`` (2.3.x) refuses VirtualBox 7.1 and newer (``invoke doctor``'s
``vagrant_drives_virtualbox`` holds the pairs). ``scripts/setup.sh`` calls ``install`` where
such a VirtualBox is installed: it downloads HashiCorp's Linux zip of a pinned version from
releases.hashicorp.com, checks it against the pinned sha256 **and** against HashiCorp's
published ``SHA256SUMS`` for that release (both must agree; a file or a list that differs is
refused, nothing is installed), and installs the ``vagrant`` binary into /usr/local/bin, ahead
of Debian's on PATH.

The pin is taken from HashiCorp's own Homebrew tap (hashicorp/homebrew-tap,
``Formula/vagrant.rb`` at 842a84f "Bump Vagrant to 2.4.9": the linux amd64 zip and its
sha256). The signature of SHA256SUMS (``.sig``, HashiCorp's GPG key) is not checked: the pin
in this file is the trust anchor, and the list must match it.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ArtifactError, DigestMismatch
from appliance.log import log

RELEASES = "https://releases.hashicorp.com"
PINNED_VERSION = "2.4.9"
PINNED_ZIP_SHA256 = "77d4d533c82c420b6b594992a902ec43fcd9f50380dc002a599e93fc744f8cfa"
INSTALL_DIR = Path("/usr/local/bin")
MAX_ZIP_BYTES = 512 << 20  # the 2.4.9 zip is about 50 MB


@dataclass(frozen=True)
class Release:
    version: str
    zip_sha256: str

    @property
    def zip_name(self) -> str:
        return f"vagrant_{self.version}_linux_amd64.zip"

    @property
    def sums_name(self) -> str:
        return f"vagrant_{self.version}_SHA256SUMS"

    def url(self, base: str, name: str) -> str:
        return f"{base.rstrip('/')}/vagrant/{self.version}/{name}"


PINNED = Release(PINNED_VERSION, PINNED_ZIP_SHA256)


def listed_digest(sums: str, name: str) -> str | None:
    """The digest ``SHA256SUMS`` gives for ``name`` (``<hex>  <name>`` lines), or None."""
    for line in sums.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == name:
            return parts[0].lower()
    return None


def _get(url: str, limit: int) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler())
    try:
        with opener.open(url, timeout=60) as resp:  # an https URL of HashiCorp's, or the test's loopback
            data = resp.read(limit + 1)
    except OSError as exc:
        raise ArtifactError(f"cannot download {url}: {exc}") from None
    if len(data) > limit:
        raise ArtifactError(f"{url} is larger than {limit >> 20} MiB; refused")
    return bytes(data)


def install(release: Release = PINNED, *, base: str = RELEASES, dest: Path = INSTALL_DIR) -> Path:
    """Download, verify and install HashiCorp's ``vagrant``; its path. Nothing is installed unless both checks pass."""
    sums_url, zip_url = release.url(base, release.sums_name), release.url(base, release.zip_name)
    sums = _get(sums_url, 1 << 20).decode(errors="replace")
    listed = listed_digest(sums, release.zip_name)
    if listed != release.zip_sha256:
        raise DigestMismatch(
            f"{sums_url} lists {listed or 'no digest'} for {release.zip_name}, not the pinned {release.zip_sha256}; "
            "nothing was installed",
            hint="the mirror serves another release list than HashiCorp's: check the address")
    data = _get(zip_url, MAX_ZIP_BYTES)
    got = hashlib.sha256(data).hexdigest()
    if got != release.zip_sha256:
        raise DigestMismatch(f"{zip_url} has sha256 {got}, not the pinned and listed {release.zip_sha256}; "
                             "nothing was installed", hint="download again; a mirror that keeps serving it is wrong")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        try:
            binary = archive.read("vagrant")
        except KeyError:
            raise ArtifactError(f"{release.zip_name} holds no `vagrant` binary") from None
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "vagrant"
    with tempfile.NamedTemporaryFile(dir=dest, prefix=".vagrant-", delete=False) as tmp:
        tmp.write(binary)
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, target)
    log.info(f"changed: installed HashiCorp's Vagrant {release.version} as {target} (sha256 checked against the pin "
             f"and {release.sums_name})")
    return target


def decide(virtualbox: tuple[int, ...], vagrant: tuple[int, ...]) -> str:
    """Why HashiCorp's Vagrant is to be installed here ("" when not): VirtualBox 7.1 or newer that the
    Vagrant on PATH (none, or Debian's) cannot drive. Versions in, decision out (tested as data)."""
    from appliance.providers.virtualbox.hostprobe import vagrant_drives_virtualbox

    if len(virtualbox) < 2 or (virtualbox[0], virtualbox[1]) < (7, 1):
        return ""
    vb = ".".join(map(str, virtualbox))
    if not vagrant:
        return f"VirtualBox {vb} is installed and Vagrant is not"
    verdict = vagrant_drives_virtualbox(vagrant, virtualbox)
    if verdict.verdict == "ok":
        return ""
    if vagrant >= tuple(int(p) for p in PINNED_VERSION.split(".")):
        return ""  # already the pinned one or newer: a newer VirtualBox line is doctor's warning, not ours
    return f"Vagrant {'.'.join(map(str, vagrant))} cannot drive VirtualBox {vb}"


def main(argv: list[str]) -> int:
    """``python3 -m appliance.hashicorp_vagrant ensure|install [BASE_URL]`` (scripts/setup.sh runs ``ensure``)."""
    if not argv or argv[0] not in ("ensure", "install") or len(argv) > 2:
        print("usage: python3 -m appliance.hashicorp_vagrant ensure|install [BASE_URL]", file=sys.stderr)
        return 2
    base = argv[1] if len(argv) == 2 else os.environ.get("CSGHUB_HASHICORP_RELEASES", RELEASES)
    if argv[0] == "ensure":
        from appliance.checks import command_version

        why = decide(command_version(["VBoxManage", "--version"]), command_version(["vagrant", "--version"]))
        if not why:
            print("setup: HashiCorp's Vagrant is not needed here (no VirtualBox 7.1+, or a Vagrant that drives it)")
            return 0
        print(f"setup: {why}: installing HashiCorp's Vagrant {PINNED_VERSION}")
    try:
        install(base=base)
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
