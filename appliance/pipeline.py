"""``invoke build-ova``: the whole build as a declared list of stages.

fetch -> base-box -> render -> up -> provision -> seal -> halt -> export -> verify -> publish

Each stage is a function taking the ``BuildContext``; the list below is the pipeline.
A stage that is switched off stays in the list and reports itself skipped. The runner
times every stage, saves ``build/state.json`` after each, and on failure or Ctrl-C keeps
the VM and ``build/`` so the next run resumes (``--on-error=destroy`` removes the VM
instead). Artifacts are assembled in ``build/staging`` and published to ``dist/`` only
after ``verify`` passed.
"""

from __future__ import annotations

import errno
import functools
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from appliance import receipt, vm
from appliance.config import ApplianceConfig, public_dump
from appliance.digest import sha256_file
from appliance.errors import ApplianceError, Cancelled, HostFileError, UsageError, VagrantError, VerifyError
from appliance.formats import FORMATS
from appliance.guest import NEED_IMAGE_SET
from appliance.log import StageStatus, StepTiming, human_size, log, timestamp
from appliance.providers.registry import provider_for
from appliance.scripts import PROVISION_DIR, declared_needs, discover_scripts, final_steps
from appliance.state import BuildState, config_digest, export_digest
from appliance.vagrant import project_dir

if TYPE_CHECKING:  # pragma: no cover
    from appliance.providers.base import Provider
    from appliance.ssh import SSHEndpoint

OnError = Literal["keep", "destroy"]


@dataclass(frozen=True)
class BuildOptions:
    """What the user asked for on the command line, beyond the configuration."""

    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    force: bool = False
    on_error: OnError = "keep"
    boot_check: bool = True


@dataclass
class BuildContext:
    cfg: ApplianceConfig
    options: BuildOptions
    state: BuildState
    # Where the build VM's sshd is, once the up stage (or the first provisioning) asked Vagrant.
    endpoint: SSHEndpoint | None = None

    @property
    def staging_dir(self) -> Path:
        return self.cfg.build_dir / "staging"

    @property
    def ova_name(self) -> str:
        return self.cfg.output.primary_ova.file_name(f"{self.cfg.output.name}-{self.cfg.appliance_version}")

    @functools.cached_property
    def provider(self) -> Provider:
        """The provider, built once from the configuration (tests assign a fake before the stages run)."""
        return provider_for(self.cfg)


@dataclass(frozen=True)
class StageOutcome:
    """What a stage did: ``ok`` (it did its work; ``note`` says what, if worth saying) or
    ``skipped`` (there was nothing to do; ``note`` says why). Failures are exceptions."""

    status: StageStatus
    note: str = ""

    @classmethod
    def done(cls, note: str = "") -> StageOutcome:
        return cls("ok", note)

    @classmethod
    def skipped(cls, why: str) -> StageOutcome:
        return cls("skipped", why)


StageFn = Callable[[BuildContext], StageOutcome]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    help: str


# -- stages ---------------------------------------------------------------------------------


def stage_fetch(ctx: BuildContext) -> StageOutcome:
    from appliance.artifacts import ensure_ovf_schemas, fetch_artifacts

    # The verify stage's OVF schemas: without them (offline) the build goes on and its report says
    # that schema validation did not run; a mirror serving other bytes stops the build here.
    schemas, _ = ensure_ovf_schemas(ctx.cfg)
    needs = declared_needs(ctx.cfg.provision.skip)
    if not needs:
        if schemas:
            return StageOutcome.done("OVF schemas only: no step that runs needs anything from the host")
        return StageOutcome.skipped("no step that runs needs anything from the host, and the OVF schemas "
                                    "could not be fetched")

    fetch_artifacts(ctx.cfg, needed_only=True)
    if NEED_IMAGE_SET in needs:
        from appliance.images import write_build_image_list

        write_build_image_list(ctx.cfg)
        from appliance.imagecache import fetch_image_set

        fetch_image_set(ctx.cfg, required=True)  # the guest never pulls: every image comes from here
    return StageOutcome.done()


def stage_render(ctx: BuildContext) -> StageOutcome:
    # libvirt as root without systemd: started here, so the KVM probe can boot the box's kernel through it.
    ctx.provider.start_services()
    rendered = vm.render(ctx.cfg, ctx.provider)
    if rendered.libvirt_driver is not None:
        ctx.state.libvirt_driver = rendered.libvirt_driver
    return StageOutcome.done(f"wrote {rendered.path}")


def stage_base_box(ctx: BuildContext) -> StageOutcome:
    if ctx.state.seal_begun:
        return StageOutcome.skipped("the VM is sealed already; it needs no box")
    from appliance.basebox import ensure_base_box

    box = ensure_base_box(ctx.cfg, ctx.provider)
    return StageOutcome.done(box.note) if box.added else StageOutcome.skipped(box.note)


def stage_up(ctx: BuildContext) -> StageOutcome:
    if ctx.state.sealed:
        return StageOutcome.skipped("the VM is already sealed; it is exported as it is")
    if ctx.state.seal_started:
        # An interrupted seal: the VM may already lack the build's key or per-copy state. While it
        # still runs, the seal step is simply run again; booting it again is never safe.
        if vm.status(ctx.cfg, ctx.provider).running:
            ctx.endpoint = vm.ssh_config(ctx.cfg, ctx.provider)
            return StageOutcome.skipped("the seal was interrupted and the VM still runs; the seal step runs again")
        from appliance.errors import VMSealed

        raise VMSealed(
            "the seal step was interrupted and the VM is off: booting it again could run the appliance's "
            "first boot inside the build VM, so the build cannot resume",
            hint="run `invoke destroy` (it removes the VM and build state), then `invoke build-ova` again",
        )
    vm.boot(ctx.cfg, ctx.provider)  # not sealed: the stage's own state said so just now
    # `up` may have fallen back from KVM to TCG: the report says what the VM really runs under.
    ctx.state.libvirt_driver = vm.rendered_driver(ctx.cfg, ctx.provider) or ctx.state.libvirt_driver
    ctx.endpoint = vm.ssh_config(ctx.cfg, ctx.provider)
    return StageOutcome.done()


def _provision(ctx: BuildContext, *, only: str | None, skip: Sequence[str]) -> None:
    from appliance.steps import Options, pinned_uploads, provision

    if ctx.endpoint is None:
        ctx.endpoint = vm.ssh_config(ctx.cfg, ctx.provider)
    uploads = pinned_uploads(ctx.cfg) if only is None else []
    provision(ctx.cfg, ctx.endpoint, Options(only=only, skip=tuple(skip)), uploads=uploads)


def stage_provision(ctx: BuildContext) -> StageOutcome:
    if ctx.state.seal_begun:
        return StageOutcome.skipped(
            "the VM is already sealed" if ctx.state.sealed else "the seal step has started")
    _provision(ctx, only=None, skip=final_steps())
    if NEED_IMAGE_SET in declared_needs(ctx.cfg.provision.skip):
        _record_images(ctx)
    return StageOutcome.done()


def _record_images(ctx: BuildContext) -> None:
    """Read back what the step that needs the image set stored (name + digest of every image) for
    build-report.json."""
    from appliance.images import record_stored_images
    from appliance.ssh import RemoteSession

    assert ctx.endpoint is not None  # _provision found it
    with RemoteSession.from_config(ctx.cfg, ctx.endpoint) as session:
        ctx.state.images = record_stored_images(session, ctx.cfg.build_dir / "manifests" / "images.txt")
    log.info(f"recorded {len(ctx.state.images)} images with their digests for the build report")


def final_step(directory: Path = PROVISION_DIR) -> str:
    """The step the seal stage runs: the one script that declares ``# appliance: final``."""
    finals = final_steps(directory)
    if len(finals) != 1:
        raise UsageError(f"the seal stage runs the one provisioning step that declares `# appliance: final`; "
                         f"provision/ has {len(finals)} ({', '.join(finals) or 'none'}): cannot seal the VM")
    return finals[0]


def stage_seal(ctx: BuildContext) -> StageOutcome:
    if ctx.state.sealed:
        return StageOutcome.skipped("already sealed")
    seal_step = final_step()
    # From here on the build's own key may no longer open the VM: record that before anything
    # else, so an interrupted seal is never resumed as an unsealed VM.
    ctx.state.seal_started = True
    ctx.state.save(ctx.cfg.build_dir)
    _provision(ctx, only=seal_step, skip=[])
    ctx.state.sealed = True
    return StageOutcome.done()


SEAL_POWEROFF_WAIT = 120  # seconds; the seal step powers the VM off a few seconds after it exits


def stage_halt(ctx: BuildContext) -> StageOutcome:
    if not ctx.state.sealed:
        vm.halt(ctx.cfg, ctx.provider)
        return StageOutcome.done()
    # A sealed VM no longer lets the build in, so a graceful `vagrant halt` (over SSH) cannot work:
    # the seal step powers the VM off itself. Wait for that; force it off only if it does not come.
    deadline = time.monotonic() + SEAL_POWEROFF_WAIT
    while vm.status(ctx.cfg, ctx.provider).running:
        if time.monotonic() > deadline:
            log.warning(f"the sealed VM did not power itself off within {SEAL_POWEROFF_WAIT} s; forcing it off")
            vm.halt(ctx.cfg, ctx.provider, force=True)
            return StageOutcome.done("forced off")
        time.sleep(3)
    # Vagrant did not halt it, so whatever Vagrant ends at a halt (vagrant-libvirt's forwards) still runs.
    ctx.provider.after_halt(project_dir(ctx.cfg))
    return StageOutcome.done("the sealed VM powered itself off")


def stage_export(ctx: BuildContext) -> StageOutcome:
    staged = Path(ctx.state.staged_ova) if ctx.state.staged_ova else None
    current = export_digest(ctx.cfg)
    if (staged is not None and staged.is_file() and ctx.state.sealed and "export" in ctx.state.completed
            and ctx.state.export_digest == current
            and all(Path(extra["path"]).is_file() for extra in ctx.state.staged_formats)):
        return StageOutcome.skipped(f"{staged.name} already exported from this sealed VM with these settings")
    ctx.staging_dir.mkdir(parents=True, exist_ok=True)
    exported = ctx.provider.export(ctx.staging_dir)
    if exported.disk is not None:
        ctx.state.disk_image = str(exported.disk)
    result = exported.ova
    ctx.state.staged_ova = str(result.path)
    ctx.state.staged_ova_sha256 = result.sha256
    from appliance.export.extra import write_extra_formats

    # The other formats of output.formats: OVAs from the disk the export was made from, disk formats
    # (qcow2, VHDX) from the disk inside the OVA just written.
    extras = write_extra_formats(ctx.cfg, exported.disk, ctx.staging_dir, ctx.provider.name, ova=result.path)
    # The sidecar's digest too: `--skip verify` publishes what the export wrote, checked against these.
    ctx.state.staged_formats = [{"format": e.format, "path": str(e.path), "sha256": e.sha256,
                                 **({"sidecar": str(e.sidecar), "sidecar_sha256": sha256_file(e.sidecar)}
                                    if e.sidecar else {})} for e in extras]
    return StageOutcome.done(", ".join([f"{result.path.name}: {human_size(result.size)}",
                                        *(e.path.name for e in extras)]))


def stage_verify(ctx: BuildContext) -> StageOutcome:
    from appliance.verify import verify_ova

    if not ctx.state.staged_ova:
        raise UsageError("nothing to verify: the export stage has not produced an OVA yet")
    if verified_by_this_tool(ctx.state):
        return StageOutcome.skipped("this OVA was verified already")
    staged = Path(ctx.state.staged_ova)
    report = verify_ova(staged, boot=ctx.options.boot_check, cfg=ctx.cfg)
    # The other OVA formats: the same structural check (their disk is the one just booted). The disk
    # formats: qemu-img's reading compared with the OVA's disk, then a boot of their own on their
    # hypervisor's hardware. Their digests go into the report the receipt signs, so publish knows
    # what was verified.
    formats: dict[str, Any] = {}
    for extra in ctx.state.staged_formats:
        path = Path(extra["path"])
        if FORMATS[extra["format"]].kind == "ova":
            checks = verify_ova(path, boot=False, cfg=ctx.cfg).as_dict()["checks"]
            formats[extra["format"]] = {"file": path.name, "sha256": sha256_file(path), "checks": checks}
        else:
            from appliance.verify_disk import verify_staged_disk

            formats[extra["format"]] = verify_staged_disk(ctx.cfg, staged, extra, boot=ctx.options.boot_check)
    # What was verified is the file as it is now: hash it again rather than trust state.json's digest.
    ctx.state.staged_ova_sha256 = sha256_file(staged)
    ctx.state.verified_sha256 = ctx.state.staged_ova_sha256
    ctx.state.verify_report = report.as_dict() | ({"formats": formats} if formats else {})
    ctx.state.verify_receipt = receipt.issue(ctx.state.verified_sha256, ctx.state.export_digest,
                                             ctx.state.verify_report)
    return StageOutcome.done()


def verified_by_this_tool(state: BuildState) -> bool:
    """The staged OVA's digest is the verified one and the receipt (appliance.receipt) proves verify said so."""
    return bool(state.verified_sha256) and state.verified_sha256 == state.staged_ova_sha256 and receipt.holds(
        state.verify_receipt, state.verified_sha256, state.export_digest, state.verify_report)


def recheck_staged(ctx: BuildContext, staged: Path) -> None:
    """Publish's own look at the staged OVA (about a second per GB): the structure, the manifest's
    digests and each disk's walk (in place, nothing copied) must still pass, whatever state.json says."""
    import tempfile

    from appliance.artifacts import cached_ovf_schemas
    from appliance.verify_ova import check_structure

    schema_dir, why = cached_ovf_schemas(ctx.cfg)
    with tempfile.TemporaryDirectory(prefix=".publish-check-", dir=staged.parent) as work:
        result = check_structure(staged, Path(work), schema_dir, schema_missing=why or "", extract=False)
    if result.findings:
        raise VerifyError(f"{staged} does not pass the structural check at publish; nothing was published",
                          result.findings)


def stage_publish(ctx: BuildContext) -> StageOutcome:
    if not ctx.state.staged_ova:
        raise UsageError("nothing to publish: the export stage has not produced an OVA yet")
    staged = Path(ctx.state.staged_ova)
    if ctx.state.export_digest != export_digest(ctx.cfg):
        # `--skip export` / `--only publish` after an output setting changed: the staged OVA holds the
        # old product, version or format, and its report would describe the new configuration.
        raise UsageError(f"{staged.name} was exported with other output settings than this configuration's; "
                         "it is not published",
                         hint="run `invoke build-ova` without --skip export (or --only publish): the export "
                              "reruns with these settings")
    dist = ctx.cfg.dist_dir
    dist.mkdir(parents=True, exist_ok=True)
    final = dist / ctx.ova_name
    digest_file = dist / (ctx.ova_name + ".sha256")
    if final.exists() and not ctx.options.force:
        raise UsageError(f"{final} exists already; pass --force to replace it (nothing was overwritten)")
    verified = verified_by_this_tool(ctx.state)
    if not verified and "verify" not in ctx.options.skip:
        claimed = ctx.state.verified_sha256 and ctx.state.verified_sha256 == ctx.state.staged_ova_sha256
        raise UsageError("the staged OVA has not passed verification; it is not published" + (
            " (state.json says it did, but carries no receipt of this tool's verify stage for it)" if claimed
            else ""), hint="run `invoke build-ova` (without --only publish): it verifies the staged OVA")
    recheck_staged(ctx, staged)
    from appliance.publish import PublishedFile, check_free_space, publish_set

    extras = _verified_extras(ctx)
    sidecars = _verified_sidecars(ctx)
    for extra_path, _ in [*extras, *sidecars]:
        if not ctx.options.force and (dist / extra_path.name).exists():
            raise UsageError(f"{dist / extra_path.name} exists already; pass --force to replace it "
                             "(nothing was overwritten)")
    build_report(ctx, final)  # any error in the report's making before a byte is copied
    check_free_space(dist, staged.stat().st_size + sum(p.stat().st_size for p, _ in [*extras, *sidecars]) + 2**20,
                     f"publishing {final.name}")
    # All or none: an OVA never sits beside the digest or report of another build. The report is
    # made last, once the OVAs and their digests are written: it records publish as done, with its time so
    # far, which is true whenever anyone can read it (the set appears whole or not at all).
    publish_set(dist, [
        PublishedFile(final.name, source=staged, sha256=ctx.state.staged_ova_sha256),
        PublishedFile(digest_file.name, data=f"{ctx.state.staged_ova_sha256}  {final.name}\n".encode()),
        *(f for path, digest in extras for f in (
            PublishedFile(path.name, source=path, sha256=digest),
            PublishedFile(path.name + ".sha256", data=f"{digest}  {path.name}\n".encode()))),
        *(PublishedFile(path.name, source=path, sha256=digest) for path, digest in sidecars),
        PublishedFile("build-report.json", produce=lambda: (json.dumps(
            build_report(ctx, final, publishing=True), indent=2) + "\n").encode()),
    ])
    return StageOutcome.done(f"published {final}" + "".join(f", {p.name}" for p, _ in [*extras, *sidecars]))


def _extra_verified(ctx: BuildContext, extra: dict[str, str]) -> bool:
    """verify checked this extra format as it was staged, under a receipt that still holds."""
    listed = ((ctx.state.verify_report or {}).get("formats") or {}).get(extra["format"])
    return (verified_by_this_tool(ctx.state) and isinstance(listed, dict)
            and listed.get("sha256") == extra["sha256"])


def _not_verified(path: Path, fmt: str) -> UsageError:
    return UsageError(f"{path.name} ({fmt}) has not passed verification; nothing was published",
                      hint="run `invoke build-ova` (without --only publish): it verifies every format")


def _verified_extras(ctx: BuildContext) -> list[tuple[Path, str]]:
    """The staged extra formats with the digests verify recorded (under its receipt); each OVA rechecked.
    With ``--skip verify``, as for the first OVA: the digests the export recorded, published unverified."""
    verified = (ctx.state.verify_report or {}).get("formats") or {}
    unverified_ok = "verify" in ctx.options.skip
    out = []
    for extra in ctx.state.staged_formats:
        path, listed = Path(extra["path"]), verified.get(extra["format"])
        if not unverified_ok and (not isinstance(listed, dict) or listed.get("sha256") != extra["sha256"]):
            raise _not_verified(path, extra["format"])
        if FORMATS[extra["format"]].kind == "ova":
            recheck_staged(ctx, path)
        out.append((path, extra["sha256"]))  # publish_set copies it only while it hashes to this digest
    return out


def _verified_sidecars(ctx: BuildContext) -> list[tuple[Path, str]]:
    """The disk formats' sidecars (the qcow2's libvirt domain) with the digests verify recorded
    (with ``--skip verify``, the digests the export recorded)."""
    verified = (ctx.state.verify_report or {}).get("formats") or {}
    unverified_ok = "verify" in ctx.options.skip
    out = []
    for extra in ctx.state.staged_formats:
        if not extra.get("sidecar"):
            continue
        path, listed = Path(extra["sidecar"]), verified.get(extra["format"]) or {}
        digest = listed.get("sidecar_sha256") if isinstance(listed, dict) else None
        if unverified_ok and not _extra_verified(ctx, extra):
            digest = extra.get("sidecar_sha256")  # none in a state.json of an older export: refused below
        if not isinstance(digest, str) or not digest:
            raise _not_verified(path, extra["format"])
        out.append((path, digest))
    return out


def _format_report(ctx: BuildContext, extra: dict[str, str]) -> dict[str, Any]:
    seen = ((ctx.state.verify_report or {}).get("formats") or {}).get(extra["format"]) or {}
    entry: dict[str, Any] = {"format": extra["format"], "file": Path(extra["path"]).name, "sha256": extra["sha256"],
                             "size_bytes": Path(extra["path"]).stat().st_size,
                             "verified": _extra_verified(ctx, extra)}
    if extra.get("sidecar"):
        entry["sidecar"] = Path(extra["sidecar"]).name
    if FORMATS[extra["format"]].kind == "disk":  # what verify saw: qemu-img's checks and the boot
        entry["verification"] = {"checks": seen.get("checks"), "boot": seen.get("boot")} if seen else None
    return entry


def _image_report(ctx: BuildContext) -> dict[str, Any] | None:
    if not ctx.state.images:
        return None
    from appliance.imagecache import report_images

    return report_images(ctx.cfg, ctx.state.images)


def _stage_entry(timing: StepTiming, publishing: bool) -> dict[str, Any]:
    """A stage as the report lists it. Made during publish, the step still running (publish itself, its
    last act being to write this report) is recorded as ``ok`` up to now: the report is only ever seen
    inside a published set."""
    if publishing and timing.outcome == "running":
        return {"name": timing.name, "start": timing.started, "end": timestamp(), "outcome": "ok",
                "seconds": round(time.monotonic() - timing.clock, 3)}
    return {"name": timing.name, "start": timing.started, "end": timing.ended, "seconds": timing.seconds,
            "outcome": timing.outcome}


def build_report(ctx: BuildContext, final: Path, *, publishing: bool = False) -> dict[str, Any]:
    staged = Path(ctx.state.staged_ova)
    disk = Path(ctx.state.disk_image) if ctx.state.disk_image else None
    disk_bytes = disk.stat().st_size if disk is not None and disk.exists() else None
    return {
        "appliance": {"name": ctx.cfg.output.name, "version": ctx.cfg.appliance_version, "ova": final.name},
        "ova": {"sha256": ctx.state.staged_ova_sha256, "size_bytes": staged.stat().st_size,
                "verified": verified_by_this_tool(ctx.state),
                # Which checks ran: says so when OVF schema validation could not run.
                "verification": ctx.state.verify_report or None},
        "disk": {"path": str(disk) if disk else "", "size_bytes": disk_bytes},
        # The other formats of output.formats, each published beside its .sha256.
        "formats": [_format_report(ctx, e) for e in ctx.state.staged_formats],
        "versions": {"k3s": ctx.cfg.k3s.version if ctx.cfg.stack_enabled else None,
                     "csghub_chart": ctx.cfg.csghub.chart_version if ctx.cfg.stack_enabled else None,
                     "images": ctx.state.images},
        # Every image with digest and size, and the totals (appliance/imagecache.py).
        "images": _image_report(ctx),
        "provider": ctx.cfg.provider,
        "libvirt_driver": ctx.state.libvirt_driver or None,
        "stages": [_stage_entry(t, publishing) for t in log.timings],
        # The configuration holds no secrets by design: every secret is made on the appliance's first boot.
        "config": public_dump(ctx.cfg),
    }


STAGES: list[Stage] = [
    Stage("fetch", stage_fetch, "download and verify pinned artifacts into the cache"),
    Stage("base-box", stage_base_box, "build the base box vm.box when Vagrant lacks it (cached, as `invoke base-box`)"),
    Stage("render", stage_render, "write the Vagrantfile into build/vm"),
    Stage("up", stage_up, "create and boot the VM"),
    Stage("provision", stage_provision, "run the provisioning steps (resumable)"),
    Stage("seal", stage_seal, "remove per-instance state and secrets"),
    Stage("halt", stage_halt, "shut the VM down"),
    Stage("export", stage_export, "write the OVA into build/staging"),
    Stage("verify", stage_verify, "check the OVA's structure and boot a fresh copy"),
    Stage("publish", stage_publish, "copy the OVA, its .sha256 and build-report.json to dist/"),
]
STAGE_NAMES = [s.name for s in STAGES]


def _split_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Sort ``--skip``/``--only`` names into stages and provisioning steps; unknown names are errors."""
    steps = [s.name for s in discover_scripts()]
    stages, step_names, unknown = [], [], []
    for name in names:
        if name in STAGE_NAMES:
            stages.append(name)
        elif name in steps:
            step_names.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise UsageError(
            f"unknown stage or step: {', '.join(unknown)}; stages: {', '.join(STAGE_NAMES)}; "
            f"steps: {', '.join(steps)}"
        )
    return stages, step_names


def skipped_steps(options: BuildOptions) -> list[str]:
    """The provisioning steps ``--skip``/``--only`` leave out (stage names are not steps)."""
    _, skip_steps = _split_names(options.skip)
    _, only_steps = _split_names(options.only)
    if only_steps:
        keep = set(only_steps) | set(final_steps())
        skip_steps += [s.name for s in discover_scripts() if s.name not in keep]
    return skip_steps


def plan_config(cfg: ApplianceConfig, options: BuildOptions) -> tuple[ApplianceConfig, list[str]]:
    """Apply step names from ``--skip``/``--only`` to the config; return it and the stages to run."""
    skip_stages, _ = _split_names(options.skip)
    only_stages, _ = _split_names(options.only)
    skip_steps = skipped_steps(options)
    if skip_steps:
        merged = sorted(set(cfg.provision.skip) | set(skip_steps))
        cfg = cfg.model_copy(update={"provision": cfg.provision.model_copy(update={"skip": merged})})
    stages = [s for s in STAGE_NAMES if s not in skip_stages and (not only_stages or s in only_stages)]
    return cfg, stages


def build_ova(
    cfg: ApplianceConfig, options: BuildOptions = BuildOptions(), *, stages: Sequence[Stage] = tuple(STAGES)
) -> BuildContext:
    """Run the pipeline. Resumes from ``build/state.json``; raises ``ApplianceError`` on failure.

    ``stages`` is the pipeline itself; tests pass recording stand-ins with the same names.
    """
    cfg, selected = plan_config(cfg, options)
    state = BuildState.load(cfg.build_dir)
    digest = config_digest(cfg)
    if state.seal_begun and state.config_digest and state.config_digest != digest:
        raise VagrantError(
            "the VM in build/ was sealed from a different configuration (a setting that shapes its disk "
            "changed) and cannot be changed any more",
            hint="run `invoke destroy` (it removes the VM and build state), then `invoke build-ova` again",
        )
    if state.config_digest != digest:
        state.completed = []
    elif state.export_digest and state.export_digest != export_digest(cfg):
        # Only what the export writes changed (a product name, the OVF format...): the VM is fine,
        # the OVA is not. Export, verify and publish again.
        log.info("output settings changed since the last export: exporting again")
        state.completed = [s for s in state.completed if s not in ("export", "verify", "publish")]
    state.config_digest, state.provider, state.vm_name = digest, cfg.provider, cfg.vm.name
    ctx = BuildContext(cfg=cfg, options=options, state=state)
    if state.completed:
        log.info(f"resuming: done before: {', '.join(state.completed)}")
    current = ""
    try:
        for stage in stages:
            current = stage.name
            with log.step(f"{stage.name}: {stage.help}") as timing:
                if stage.name not in selected:
                    timing.outcome = "skipped"
                    log.info("skipped (--skip/--only)")
                    continue
                outcome = stage.run(ctx)
                if outcome.note:
                    log.info(f"skipped: {outcome.note}" if outcome.status == "skipped" else outcome.note)
                timing.outcome = outcome.status
            state.mark_done(stage.name)
            if stage.name == "export":
                state.export_digest = export_digest(cfg)  # what the staged OVA was written from
            state.last_failure = ""
            state.save(cfg.build_dir)
    except KeyboardInterrupt:
        state.last_failure = f"interrupted during {current}"
        _save_failure(state, cfg.build_dir)
        raise Cancelled(
            f"interrupted during stage {current!r}; the VM and {cfg.build_dir} are kept",
            hint="run `invoke build-ova` again to resume where it stopped",
        ) from None
    except (ApplianceError, OSError) as exc:
        error = exc if isinstance(exc, ApplianceError) else host_file_error(
            exc, f"stage {current!r}", folders=(cfg.build_dir, cfg.dist_dir))
        state.last_failure = f"{current}: {error.message.splitlines()[0]}"
        _save_failure(state, cfg.build_dir)
        _after_failure(cfg, options, current)
        if error is exc:
            raise
        raise error from exc
    return ctx


def host_file_error(exc: OSError, during: str, *, folders: Sequence[Path] = ()) -> HostFileError:
    """A plain message for a failed file operation on the build host (disk full above all).

    ``folders`` are where the failing code writes; a write error often names no file, so the
    free space of each is shown instead.
    """
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        candidates = [Path(str(exc.filename)).parent] if exc.filename else list(folders)
        free = "; ".join(f"{human_size(shutil.disk_usage(f).free)} are free in {f}"
                         for f in dict.fromkeys(candidates) if f.is_dir())
        free = f"; {free}" if free else ""
        return HostFileError(
            f"{during} failed: no space left on the device{where}{free}",
            hint="free space there (or point output.dir / output.build_dir elsewhere), then run the same "
                 "command again: it resumes, and nothing half-written was kept",
        )
    return HostFileError(f"{during} failed: {exc.strerror or exc}{where}")


def _save_failure(state: BuildState, build_dir: Path) -> None:
    # The failure may be a full disk under build/ itself: recording it must not hide the real error.
    try:
        state.save(build_dir)
    except OSError as exc:
        log.warning(f"could not record the failure in {BuildState.path_for(build_dir)}: {exc.strerror or exc}")


def destroy_build(cfg: ApplianceConfig) -> None:
    """``invoke destroy``: remove the VM, then the build state and staged OVA that belonged to it.

    Published artifacts in the output directory are kept.
    """
    vm.destroy(cfg, provider_for(cfg))
    BuildState.path_for(cfg.build_dir).unlink(missing_ok=True)
    staging = cfg.build_dir / "staging"
    if staging.is_dir():
        shutil.rmtree(staging)
        log.info(f"removed {staging}")


def _after_failure(cfg: ApplianceConfig, options: BuildOptions, stage: str) -> None:
    if options.on_error == "destroy":
        log.warning("--on-error=destroy: removing the VM")
        try:
            destroy_build(cfg)
        except ApplianceError as exc:
            log.error(f"could not destroy the VM: {exc}; check `invoke status`")
    else:
        log.warning(
            f"stage {stage!r} failed; the VM and {cfg.build_dir} are kept for resume: fix the cause and run "
            "`invoke build-ova` again (or `invoke destroy` to start over)"
        )
