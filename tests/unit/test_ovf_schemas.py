"""The DMTF OVF schemas as a pinned artifact: fetched through the real download code from a loopback
mirror of ../shared/ovf/schemas, verified file by file, made visible as one folder; and what
``verify-ova`` says and records when it has them and when it has not.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.artifacts import (
    LOCK_FILE,
    SCHEMA_FILE_MAX_BYTES,
    cached_ovf_schemas,
    ensure_ovf_schemas,
    fetch_ovf_schemas,
    ovf_schema_pins,
    read_lock,
    write_lock,
)
from appliance.config import PROJECT_ROOT, ApplianceConfig, load_config
from appliance.errors import ArtifactError, DigestMismatch
from tests.unit.conftest import OVF_SCHEMAS
from tests.unit.test_artifacts import Publisher, serving

PINS = ovf_schema_pins(read_lock())


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Publisher]:
    """A private copy of ../shared/ovf/schemas (tests may alter it) behind a loopback HTTP server that
    counts requests and honours Range."""
    if not (OVF_SCHEMAS / "ovf1").is_dir():
        pytest.skip(f"OVF schemas not found at {OVF_SCHEMAS} (the shared reference data sits next to the clone)")
    root = tmp_path / "www"
    shutil.copytree(OVF_SCHEMAS, root / "schemas")
    with serving(Publisher(root), "/schemas") as pub:
        yield pub


def config(tmp_path: Path, mirror: str) -> ApplianceConfig:
    return load_config(None, [f"artifacts.cache_dir={tmp_path / 'cache'}", f"artifacts.ovf_schema_mirror={mirror}"],
                       "libvirt", cwd=tmp_path)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def visible_folders(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "ovf-schemas"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# -- the pins ---------------------------------------------------------------------------------------


def test_pins_are_the_upstream_blobs_named_in_shared_source_txt() -> None:
    """Each pinned digest is that of the ../shared copy, whose git blob id is the one SOURCE.txt lists, and
    each URL names the repository and commit SOURCE.txt gives for that file."""
    if not (OVF_SCHEMAS / "SOURCE.txt").is_file():
        pytest.skip(f"OVF schemas not found at {OVF_SCHEMAS}")
    source = (OVF_SCHEMAS / "SOURCE.txt").read_text()
    ovf1_part, ovf2_part = source.split("\novf2/", 1)
    assert len(PINS) == 17 and {p.set for p in PINS} == {"ovf1", "ovf2"}
    for pin in PINS:
        data = (OVF_SCHEMAS / pin.set / pin.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == pin.sha256, pin.rel
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        part = ovf1_part if pin.set == "ovf1" else ovf2_part
        # The file's entry: a line starting with its name; the first blob id after it is the file's.
        entry = re.search(rf"^\s+{re.escape(pin.name)}\s", part, re.M)
        listed = re.search(r"blob ([0-9a-f]{40})", part[entry.start():]) if entry else None
        assert listed and listed.group(1) == blob, f"{pin.rel}: its blob {blob} is not the one SOURCE.txt lists"
        match = re.fullmatch(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", pin.url)
        assert match, pin.url
        repo, commit, path = match.groups()
        assert f"Repository: {repo}" in part, pin.url
        assert commit in part and path.endswith("/" + pin.name), pin.url


def test_invoke_lock_keeps_the_pins(tmp_path: Path) -> None:
    lock_path = tmp_path / "versions.lock.yaml"
    shutil.copyfile(LOCK_FILE, lock_path)
    lock = read_lock(lock_path)
    lock["helm"]["v3.17.3"]["helm-v3.17.3-linux-amd64.tar.gz"] = "a" * 64
    write_lock(lock, lock_path)
    assert ovf_schema_pins(read_lock(lock_path)) == PINS
    assert lock_path.read_text().startswith("# Version lock")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s["ovf1"].update({"../evil.xsd": {"url": "https://x.example/a", "sha256": "0" * 64}}),
     "'../evil.xsd' is not a plain .xsd file name"),
    (lambda s: s["ovf2"]["xml.xsd"].update(sha256=None), "`sha256` must be 64 hex digits"),
    (lambda s: s["ovf2"]["xml.xsd"].update(url="http://insecure.example/xml.xsd"), "`url` must be an https URL"),
    (lambda s: s.pop("ovf2"), "must map exactly ovf1 and ovf2"),
    (lambda s: s["ovf1"].pop("dsp8023_1.1.1.xsd"), "exactly one envelope schema"),
])
def test_a_malformed_pin_is_refused(edit: Callable[[dict[str, dict[str, dict[str, object]]]], object],
                                    message: str) -> None:
    lock = read_lock()
    edit(lock["ovf_schemas"])
    with pytest.raises(ArtifactError, match=re.escape(message)):
        ovf_schema_pins(lock)


# -- fetching ---------------------------------------------------------------------------------------


def test_fetched_verified_then_served_from_the_cache(mirror: Publisher, tmp_path: Path) -> None:
    cfg = config(tmp_path, mirror.base)
    assert cached_ovf_schemas(cfg)[0] is None
    folder = fetch_ovf_schemas(cfg)
    assert sorted(f"{p.parent.name}/{p.name}" for p in folder.rglob("*.xsd")) == sorted(p.rel for p in PINS)
    for pin in PINS:
        assert (folder / pin.rel).read_bytes() == (OVF_SCHEMAS / pin.rel).read_bytes()
    assert len(mirror.requests) == 17
    assert visible_folders(tmp_path) == [folder.name]  # no staging folder, no .part left
    assert cached_ovf_schemas(cfg) == (folder, "")
    assert fetch_ovf_schemas(cfg) == folder
    assert len(mirror.requests) == 17  # a second fetch re-hashes, downloads nothing


def test_a_tampered_file_is_refused_and_nothing_usable_is_cached(mirror: Publisher, tmp_path: Path) -> None:
    cfg = config(tmp_path, mirror.base)
    tampered = mirror.root / "schemas" / "ovf2" / "common.xsd"
    tampered.write_bytes(tampered.read_bytes().replace(b"DMTF", b"DMTG", 1))
    with pytest.raises(DigestMismatch) as err:
        fetch_ovf_schemas(cfg)
    pin = next(p for p in PINS if p.rel == "ovf2/common.xsd")
    text = str(err.value)
    assert "OVF schema ovf2/common.xsd" in text and f"{mirror.base}/ovf2/common.xsd" in text
    assert f"expected sha256 {pin.sha256}" in text and f"got             {sha(tampered)}" in text
    assert "artifacts.ovf_schema_mirror" in text and "no schema folder was made usable" in text
    folder, why = cached_ovf_schemas(cfg)
    assert folder is None and "`invoke fetch`" in why
    assert [n for n in visible_folders(tmp_path) if not n.endswith(".incomplete")] == []
    assert not list((tmp_path / "cache").rglob("*.part"))
    assert not [p for p in (tmp_path / "cache").rglob("common.xsd") if p.parent.name == "ovf2"]
    # verify-ova refuses to go on with a mirror serving other bytes: that is no network outage.
    with pytest.raises(DigestMismatch):
        ensure_ovf_schemas(cfg)
    # Once the mirror is fixed, the next fetch resumes: only the files not yet verified are requested.
    shutil.copyfile(OVF_SCHEMAS / "ovf2" / "common.xsd", tampered)
    before = len(mirror.requests)
    folder = fetch_ovf_schemas(cfg)
    fetched = mirror.paths()[before:]
    assert "/schemas/ovf2/common.xsd" in fetched and "/schemas/ovf1/dsp8023_1.1.1.xsd" not in fetched
    assert cached_ovf_schemas(cfg) == (folder, "")
    assert visible_folders(tmp_path) == [folder.name]


def test_a_mirror_serving_a_huge_file_is_cut_off_before_it_fills_the_disk(mirror: Publisher, tmp_path: Path) -> None:
    cfg = config(tmp_path, mirror.base)
    huge = mirror.root / "schemas" / "ovf1" / "xml.xsd"
    huge.write_bytes(b"<" * (SCHEMA_FILE_MAX_BYTES + 1))
    with pytest.raises(ArtifactError) as err:
        fetch_ovf_schemas(cfg)
    text = str(err.value)
    assert "OVF schema ovf1/xml.xsd" in text and "larger than it can be" in text and "1.0 MiB" in text
    assert "artifacts.ovf_schema_mirror" in text
    assert not list((tmp_path / "cache").rglob("*.part"))
    assert cached_ovf_schemas(cfg)[0] is None


def test_a_mirror_missing_a_file_is_a_clear_error(mirror: Publisher, tmp_path: Path) -> None:
    cfg = config(tmp_path, mirror.base)
    (mirror.root / "schemas" / "ovf2" / "xenc-schema.xsd").unlink()
    with pytest.raises(ArtifactError) as err:
        fetch_ovf_schemas(cfg)
    assert not isinstance(err.value, DigestMismatch)
    text = str(err.value)
    assert "OVF schema ovf2/xenc-schema.xsd" in text and "404" in text and f"{mirror.base}/ovf2/xenc-schema.xsd" in text
    assert "artifacts.ovf_schema_mirror" in text
    assert cached_ovf_schemas(cfg)[0] is None
    # verify-ova: the check does not run, and the reason says what failed and how to fix it.
    folder, why = ensure_ovf_schemas(cfg)
    assert folder is None and "xenc-schema.xsd" in why and "`invoke fetch`" in why


def test_an_interrupted_download_resumes(mirror: Publisher, tmp_path: Path) -> None:
    cfg = config(tmp_path, mirror.base)
    mirror.cut_after["/schemas/ovf2/dsp8023_2.0.1.xsd"] = 20_000
    with pytest.raises(ArtifactError, match="interrupted"):
        fetch_ovf_schemas(cfg)
    assert cached_ovf_schemas(cfg)[0] is None
    folder = fetch_ovf_schemas(cfg)
    assert ("/schemas/ovf2/dsp8023_2.0.1.xsd", "bytes=20000-") in mirror.requests
    assert sha(folder / "ovf2" / "dsp8023_2.0.1.xsd") == sha(OVF_SCHEMAS / "ovf2" / "dsp8023_2.0.1.xsd")


def test_an_altered_cache_is_not_used_and_is_repaired(mirror: Publisher, tmp_path: Path) -> None:
    cfg = config(tmp_path, mirror.base)
    folder = fetch_ovf_schemas(cfg)
    (folder / "ovf1" / "xml.xsd").write_text("<xs:schema/>")
    found, why = cached_ovf_schemas(cfg)
    assert found is None and "ovf1/xml.xsd: expected sha256" in why
    before = len(mirror.requests)
    assert fetch_ovf_schemas(cfg) == folder
    assert mirror.paths()[before:] == ["/schemas/ovf1/xml.xsd"]
    # A stray envelope schema would be picked up by the validator: a folder holding one is not the pinned set.
    (folder / "ovf2" / "dsp8023_9.9.xsd").write_text("<xs:schema/>")
    found, why = cached_ovf_schemas(cfg)
    assert found is None and "ovf2/dsp8023_9.9.xsd: not a pinned file" in why
    assert fetch_ovf_schemas(cfg) == folder and not (folder / "ovf2" / "dsp8023_9.9.xsd").exists()


def test_a_file_url_mirror_works_offline(tmp_path: Path) -> None:
    if not (OVF_SCHEMAS / "ovf1").is_dir():
        pytest.skip(f"OVF schemas not found at {OVF_SCHEMAS}")
    folder = fetch_ovf_schemas(config(tmp_path, OVF_SCHEMAS.as_uri()))
    assert sha(folder / "ovf2" / "dsp8023_2.0.1.xsd") == sha(OVF_SCHEMAS / "ovf2" / "dsp8023_2.0.1.xsd")


def test_the_mirror_setting_is_validated(tmp_path: Path) -> None:
    from appliance.errors import ConfigError

    for bad in ("ftp://x.example/schemas", "http://x.example/schemas/", "schemas"):
        with pytest.raises(ConfigError, match=re.escape("artifacts.ovf_schema_mirror")):
            load_config(None, [f"artifacts.ovf_schema_mirror={bad}"], "libvirt", cwd=tmp_path)


# -- verify-ova ---------------------------------------------------------------------------------------


def test_verify_ova_fetches_the_schemas_then_checks(mirror: Publisher, built_ova: Path, tmp_path: Path) -> None:
    from appliance.verify import verify_from_config

    report = verify_from_config(config(tmp_path, mirror.base), built_ova, boot=False)
    assert dict(report.checks)["OVF schema"] == "checked" and report.schema_checked
    assert len(mirror.requests) == 17
    assert report.as_dict()["checks"]["OVF schema"] == "checked"  # type: ignore[index]


def test_verify_ova_offline_says_the_check_did_not_run_and_why(built_ova: Path, tmp_path: Path) -> None:
    from appliance.verify import verify_from_config

    report = verify_from_config(config(tmp_path, "http://127.0.0.1:9"), built_ova, boot=False)
    outcome = dict(report.checks)["OVF schema"]
    assert outcome.startswith("not run: the pinned DMTF OVF schemas are not in the cache and could not be fetched")
    assert "cannot reach 127.0.0.1:9" in outcome and "`invoke fetch`" in outcome
    assert not report.schema_checked and report.as_dict()["checks"]["OVF schema"] == outcome  # type: ignore[index]

    report = verify_from_config(config(tmp_path, "http://127.0.0.1:9"), built_ova, boot=False, fetch_schemas=False)
    outcome = dict(report.checks)["OVF schema"]
    assert "not in the cache" in outcome and "--no-fetch was given; `invoke fetch` downloads them" in outcome


def test_invoke_verify_ova_no_fetch_names_the_missing_check(built_ova: Path, tmp_path: Path) -> None:
    """Through the real CLI: exit 0 (the OVA is sound), and the summary says what was not checked and how to fix it."""
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "verify-ova", str(built_ova), "--no-boot", "--no-fetch",
         "--set", f"artifacts.cache_dir={tmp_path / 'cache'}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "OVF schema validation did not run" in out and "invoke fetch" in out
    assert "verified, except for the OVF schema" in out
    assert not (tmp_path / "cache").exists()  # --no-fetch: nothing downloaded


def test_the_build_verify_stage_uses_only_the_cache(built_ova: Path, tmp_path: Path, ovf_schema_dir: Path) -> None:
    """The build's verify stage (``verify_ova(cfg=...)``) validates with the cached folder, never fetches."""
    from appliance.verify import verify_ova

    cached = load_config(None, [f"artifacts.cache_dir={ovf_schema_dir.parents[1]}",
                                "artifacts.ovf_schema_mirror=http://127.0.0.1:9"], "libvirt", cwd=tmp_path)
    assert dict(verify_ova(built_ova, boot=False, cfg=cached).checks)["OVF schema"] == "checked"
    empty = config(tmp_path, "http://127.0.0.1:9")
    outcome = dict(verify_ova(built_ova, boot=False, cfg=empty).checks)["OVF schema"]
    assert outcome.startswith("not run: the pinned DMTF OVF schemas are not in the cache")
    assert "`invoke fetch`" in outcome


# -- the build ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reachable", [True, False])
def test_the_build_fetches_the_schemas_and_its_report_records_the_check(
    mirror: Publisher, built_ova: Path, tmp_path: Path, reachable: bool
) -> None:
    """fetch stage (stack skipped: only the schemas) -> verify stage (structure only) -> build-report.json."""
    from appliance.pipeline import BuildContext, BuildOptions, StageOutcome, build_report, stage_fetch, stage_verify
    from appliance.state import BuildState

    base = mirror.base if reachable else "http://127.0.0.1:9"
    cfg = load_config(None, ["provision.skip=[k3s, csghub]", f"output.build_dir={tmp_path / 'build'}",
                             f"artifacts.cache_dir={tmp_path / 'cache'}", f"artifacts.ovf_schema_mirror={base}"],
                      "libvirt", cwd=tmp_path)
    digest = sha(built_ova)
    ctx = BuildContext(cfg=cfg, options=BuildOptions(boot_check=False),
                       state=BuildState(staged_ova=str(built_ova), staged_ova_sha256=digest))
    outcome = stage_fetch(ctx)
    stage_verify(ctx)
    recorded = build_report(ctx, tmp_path / "dist" / "x.ova")["ova"]["verification"]["checks"]["OVF schema"]
    if reachable:
        assert outcome == StageOutcome.done("OVF schemas only: no step that runs needs anything from the host")
        assert recorded == "checked"
    else:
        assert outcome.status == "skipped" and "could not be fetched" in outcome.note
        assert recorded.startswith("not run: the pinned DMTF OVF schemas are not in the cache")
        assert "`invoke fetch`" in recorded


def test_the_build_stops_at_fetch_when_the_mirror_serves_other_bytes(mirror: Publisher, tmp_path: Path) -> None:
    from appliance.pipeline import BuildContext, BuildOptions, stage_fetch
    from appliance.state import BuildState

    (mirror.root / "schemas" / "ovf1" / "xml.xsd").write_text("<xs:schema/>")
    cfg = load_config(None, ["provision.skip=[k3s, csghub]", f"output.build_dir={tmp_path / 'build'}",
                             f"artifacts.cache_dir={tmp_path / 'cache'}", f"artifacts.ovf_schema_mirror={mirror.base}"],
                      "libvirt", cwd=tmp_path)
    with pytest.raises(DigestMismatch, match=re.escape("OVF schema ovf1/xml.xsd")):
        stage_fetch(BuildContext(cfg=cfg, options=BuildOptions(), state=BuildState()))
