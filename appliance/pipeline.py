"""``invoke build-ova``: the whole build as a declared list of stages.

fetch -> render -> up -> provision -> seal -> halt -> export -> verify -> publish

Each stage is a function taking the ``BuildContext``; the list below is the pipeline.
A stage that is switched off stays in the list and reports itself skipped. The runner
times every stage, saves ``build/state.json`` after each, and on failure or Ctrl-C keeps
the VM and ``build/`` so the next run resumes (``--on-error=destroy`` removes the VM
instead). Artifacts are assembled in ``build/staging`` and published to ``dist/`` only
after ``verify`` passed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance.config import ApplianceConfig, public_dump
from appliance.errors import ApplianceError, Cancelled, UsageError, VagrantError
from appliance.log import log
from appliance.scripts import discover_scripts
from appliance.state import BuildState, config_digest

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
    endpoint: Any = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def staging_dir(self) -> Path:
        return self.cfg.build_dir / "staging"

    @property
    def ova_name(self) -> str:
        return f"{self.cfg.output.name}-{self.cfg.appliance_version}.ova"


StageFn = Callable[[BuildContext], str | None]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    help: str


# -- stages ---------------------------------------------------------------------------------


def stage_fetch(ctx: BuildContext) -> str | None:
    if not ctx.cfg.stack_enabled:
        return "skipped: the k3s and CSGHub steps are skipped, no artifacts needed"
    from appliance.artifacts import fetch_artifacts

    fetch_artifacts(ctx.cfg, needed_only=True)
    return None


def stage_render(ctx: BuildContext) -> str | None:
    from appliance import vagrant

    rendered = vagrant.render(ctx.cfg)
    if rendered.libvirt_driver is not None:
        ctx.state.libvirt_driver = rendered.libvirt_driver
    return f"wrote {rendered.path}"


def stage_up(ctx: BuildContext) -> str | None:
    if ctx.state.sealed:
        return "skipped: the VM is already sealed; it is exported as it is"
    from appliance import vagrant

    vagrant.up(ctx.cfg)
    ctx.endpoint = vagrant.ssh_config(ctx.cfg)
    return None


def _provision(ctx: BuildContext, *, only: str | None, skip: Sequence[str]) -> None:
    from appliance.steps import pinned_uploads, provision

    if ctx.endpoint is None:
        from appliance import vagrant

        ctx.endpoint = vagrant.ssh_config(ctx.cfg)
    uploads = pinned_uploads(ctx.cfg) if only is None else []
    provision(ctx.cfg, ctx.endpoint, only=only, skip=tuple(skip), uploads=uploads)


def stage_provision(ctx: BuildContext) -> str | None:
    if ctx.state.sealed:
        return "skipped: the VM is already sealed"
    _provision(ctx, only=None, skip=[SEAL_STEP])
    return None


SEAL_STEP = "seal"


def stage_seal(ctx: BuildContext) -> str | None:
    if ctx.state.sealed:
        return "skipped: already sealed"
    if SEAL_STEP not in {s.name for s in discover_scripts()}:
        raise UsageError(f"no provision/NN-{SEAL_STEP}.sh script: cannot seal the VM")
    # From here on the build's own key no longer opens the VM: record it before anything else.
    _provision(ctx, only=SEAL_STEP, skip=[])
    ctx.state.sealed = True
    return None


SEAL_POWEROFF_WAIT = 120  # seconds; the seal step powers the VM off a few seconds after it exits


def stage_halt(ctx: BuildContext) -> str | None:
    from appliance import vagrant

    if not ctx.state.sealed:
        vagrant.halt(ctx.cfg)
        return None
    # A sealed VM no longer lets the build in, so a graceful `vagrant halt` (over SSH) cannot work:
    # the seal step powers the VM off itself. Wait for that; force it off only if it does not come.
    deadline = time.monotonic() + SEAL_POWEROFF_WAIT
    while vagrant.status(ctx.cfg).running:
        if time.monotonic() > deadline:
            log.warning(f"the sealed VM did not power itself off within {SEAL_POWEROFF_WAIT} s; forcing it off")
            vagrant.halt(ctx.cfg, force=True)
            return "forced off"
        time.sleep(3)
    return "the sealed VM powered itself off"


def stage_export(ctx: BuildContext) -> str | None:
    staged = Path(ctx.state.staged_ova) if ctx.state.staged_ova else None
    if staged is not None and staged.is_file() and ctx.state.sealed and "export" in ctx.state.completed:
        return f"skipped: {staged.name} already exported from this sealed VM"
    ctx.staging_dir.mkdir(parents=True, exist_ok=True)
    if ctx.cfg.provider == "virtualbox":
        from appliance.export.virtualbox import export_virtualbox

        result = export_virtualbox(ctx.cfg, ctx.staging_dir)
    else:
        from appliance import vagrant
        from appliance.export.libvirt import export_libvirt, find_domain_disk

        disk = find_domain_disk(ctx.cfg.libvirt.uri, vagrant.domain_name(ctx.cfg))
        ctx.state.disk_image = str(disk)
        result = export_libvirt(ctx.cfg, disk, ctx.staging_dir)
    ctx.state.staged_ova = str(result.path)
    ctx.state.staged_ova_sha256 = result.sha256
    return f"{result.path.name}: {result.size / 1e6:.0f} MB"


def stage_verify(ctx: BuildContext) -> str | None:
    from appliance.verify import verify_ova

    if not ctx.state.staged_ova:
        raise UsageError("nothing to verify: the export stage has not produced an OVA yet")
    if ctx.state.verified_sha256 and ctx.state.verified_sha256 == ctx.state.staged_ova_sha256:
        return "skipped: this OVA was verified already"
    verify_ova(Path(ctx.state.staged_ova), boot=ctx.options.boot_check, cfg=ctx.cfg)
    ctx.state.verified_sha256 = ctx.state.staged_ova_sha256
    return None


def stage_publish(ctx: BuildContext) -> str | None:
    if not ctx.state.staged_ova:
        raise UsageError("nothing to publish: the export stage has not produced an OVA yet")
    staged = Path(ctx.state.staged_ova)
    dist = ctx.cfg.dist_dir
    dist.mkdir(parents=True, exist_ok=True)
    final = dist / ctx.ova_name
    digest_file = dist / (ctx.ova_name + ".sha256")
    if final.exists() and not ctx.options.force:
        raise UsageError(f"{final} exists already; pass --force to replace it (nothing was overwritten)")
    verified = ctx.state.verified_sha256 == ctx.state.staged_ova_sha256
    if not verified and "verify" not in ctx.options.skip:
        raise UsageError("the staged OVA has not passed verification; it is not published")
    report = build_report(ctx, final)
    tmp = final.with_name(final.name + ".partial")
    shutil.copyfile(staged, tmp)
    os.replace(tmp, final)
    digest_file.write_text(f"{ctx.state.staged_ova_sha256}  {final.name}\n")
    (dist / "build-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return f"published {final}"


def build_report(ctx: BuildContext, final: Path) -> dict[str, Any]:
    staged = Path(ctx.state.staged_ova)
    disk = Path(ctx.state.disk_image) if ctx.state.disk_image else None
    disk_bytes = disk.stat().st_size if disk is not None and disk.exists() else None
    return {
        "appliance": {"name": ctx.cfg.output.name, "version": ctx.cfg.appliance_version, "ova": final.name},
        "ova": {"sha256": ctx.state.staged_ova_sha256, "size_bytes": staged.stat().st_size,
                "verified": ctx.state.verified_sha256 == ctx.state.staged_ova_sha256},
        "disk": {"path": str(disk) if disk else "", "size_bytes": disk_bytes},
        "versions": {"k3s": ctx.cfg.k3s.version if ctx.cfg.stack_enabled else None,
                     "csghub_chart": ctx.cfg.csghub.chart_version if ctx.cfg.stack_enabled else None,
                     "images": ctx.state.images},
        "provider": ctx.cfg.provider,
        "libvirt_driver": ctx.state.libvirt_driver or None,
        "stages": [
            {"name": t.name, "start": t.started, "end": t.ended, "seconds": t.seconds, "outcome": t.outcome}
            for t in log.timings
        ],
        # The configuration holds no secrets by design: every secret is made on the appliance's first boot.
        "config": public_dump(ctx.cfg),
    }


STAGES: list[Stage] = [
    Stage("fetch", stage_fetch, "download and verify pinned artifacts into the cache"),
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


def plan_config(cfg: ApplianceConfig, options: BuildOptions) -> tuple[ApplianceConfig, list[str]]:
    """Apply step names from ``--skip``/``--only`` to the config; return it and the stages to run."""
    skip_stages, skip_steps = _split_names(options.skip)
    only_stages, only_steps = _split_names(options.only)
    if only_steps:
        keep = set(only_steps) | {SEAL_STEP}
        skip_steps += [s.name for s in discover_scripts() if s.name not in keep]
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
    if state.sealed and state.config_digest and state.config_digest != digest:
        raise VagrantError(
            "the VM in build/ was sealed from a different configuration and cannot be changed any more",
            hint="run `invoke destroy` (it removes the VM and build state), then `invoke build-ova` again",
        )
    if state.config_digest != digest:
        state.completed = []
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
                note = stage.run(ctx)
                if note:
                    log.info(note)
                    if note.startswith("skipped"):
                        timing.outcome = "skipped"
            state.mark_done(stage.name)
            state.last_failure = ""
            state.save(cfg.build_dir)
    except KeyboardInterrupt:
        state.last_failure = f"interrupted during {current}"
        state.save(cfg.build_dir)
        raise Cancelled(
            f"interrupted during stage {current!r}; the VM and {cfg.build_dir} are kept",
            hint="run `invoke build-ova` again to resume where it stopped",
        ) from None
    except ApplianceError as exc:
        state.last_failure = f"{current}: {exc.message.splitlines()[0]}"
        state.save(cfg.build_dir)
        _after_failure(cfg, options, current)
        raise
    return ctx


def destroy_build(cfg: ApplianceConfig) -> None:
    """``invoke destroy``: remove the VM, then the build state and staged OVA that belonged to it.

    Published artifacts in the output directory are kept.
    """
    from appliance import vagrant

    vagrant.destroy(cfg)
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
