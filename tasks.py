"""Invoke tasks: flags in, one call into ``appliance`` out.

Each task turns its flags into arguments, makes one call into the ``appliance`` package and
lets ``cli_task`` turn an ``ApplianceError`` into a clean exit (message, status; traceback
only with ``--debug``). Nothing here runs commands, opens connections or renders templates.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from invoke import task
from invoke.context import Context
from invoke.exceptions import Exit

from appliance.config import ApplianceConfig, load_config, resolve_provider
from appliance.errors import ApplianceError
from appliance.log import debugging, log
from appliance.run import Terminated, termination_as_interrupt

F = TypeVar("F", bound=Callable[..., Any])

# Flags every config-reading task accepts (help text shown by `invoke --help TASK`).
CONFIG_HELP = {
    "config": "Config file (default: ./appliance.yaml when present).",
    "set": "Override a setting, Helm style: --set vm.cpus=4 (repeatable).",
    "provider": "Shorthand for --set provider=X (virtualbox, libvirt or auto).",
    "debug": "Show every command run and full tracebacks.",
}


def cli_task(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """``@task`` plus error handling: ``ApplianceError`` becomes ``invoke.Exit`` with its exit status."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(c: Context, *a: Any, **kw: Any) -> Any:
            try:
                with debugging(bool(kw.get("debug"))), termination_as_interrupt():
                    return fn(c, *a, **kw)
            except ApplianceError as exc:
                if kw.get("debug"):
                    log.console.print_exception()
                log.error(str(exc))
                raise Exit(code=exc.exit_code) from None
            except KeyboardInterrupt as exc:
                log.error(f"interrupted ({exc})" if isinstance(exc, Terminated) else "interrupted")
                raise Exit(code=130) from None
            except OSError as exc:
                # A file error no code path turned into an ApplianceError (a full disk, a folder that
                # cannot be made): one line naming it, never a traceback.
                if kw.get("debug"):
                    log.console.print_exception()
                where = f" ({exc.filename})" if exc.filename else ""
                log.error(f"{fn.__name__.replace('_', '-')} failed: {exc.strerror or exc}{where}")
                raise Exit(code=1) from None

        params = set(inspect.signature(fn).parameters)
        shared = {k: v for k, v in CONFIG_HELP.items() if k in params or f"{k}_" in params}
        help_ = {**shared, **kwargs.pop("help", {})}
        iterable = list(kwargs.pop("iterable", [])) + (["set_"] if "set_" in params else [])
        return task(*args, help=help_, iterable=iterable, **kwargs)(inner)  # type: ignore[no-any-return]

    return wrap


def config_from_flags(
    config: str | None, set_: list[str] | None, provider: str | None, *, resolve: bool = True,
    skip_steps: list[str] | None = None,
) -> ApplianceConfig:
    cfg = load_config(config, set_ or [], provider, skip_steps=skip_steps or ())
    if resolve:
        cfg, why = resolve_provider(cfg)
        if why:
            log.info(why)
    return cfg


@cli_task()
def config(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
           debug: bool = False) -> None:
    """Validate the configuration and print it fully resolved (YAML)."""
    from appliance.config import public_dump
    from appliance.render import dump_yaml

    print(dump_yaml(public_dump(config_from_flags(config, set_, provider))), end="")


@cli_task(help={"output": "Where to write the Vagrantfile (default: build/vm, the project the other tasks use)."})
def render(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
           output: str | None = None, debug: bool = False) -> None:
    """Render the Vagrantfile for the configured provider (pinned artifacts must be fetched)."""
    from appliance.vagrant import render as render_project

    rendered = render_project(config_from_flags(config, set_, provider), output)
    log.success(f"wrote {rendered.path}; boot it with `vagrant up` in {rendered.path.parent}")


@cli_task()
def doctor(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
           debug: bool = False) -> None:
    """Check this host for everything the configured provider needs; exit non-zero if a build cannot run."""
    from appliance.doctor import run_doctor

    run_doctor(config_from_flags(config, set_, provider))


@cli_task()
def docs(c: Context, debug: bool = False) -> None:
    """Regenerate docs/configuration.md from the config models and the formats table of docs/formats.md."""
    from appliance.reference import write_formats_reference, write_reference

    log.success(f"wrote {write_reference()}")
    log.success(f"wrote {write_formats_reference()}")


@cli_task(help={
    "skip": "Comma-separated stages or provisioning steps to skip (e.g. k3s,csghub or verify).",
    "only": "Comma-separated stages or steps to run alone (the others are skipped).",
    "force": "Replace an existing OVA in the output directory.",
    "on_error": "On failure: keep (default: keep the VM and build/ to resume) or destroy (remove the VM).",
    "no_boot_check": "Verify the OVA's structure only, without booting a copy.",
})
def build_ova(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
              skip: str = "", only: str = "", force: bool = False, on_error: str = "keep",
              no_boot_check: bool = False, debug: bool = False) -> None:
    """Build the OVA: fetch, base-box, render, up, provision, seal, halt, export, verify, publish (resumable)."""
    from appliance.errors import UsageError
    from appliance.pipeline import BuildOptions, skipped_steps
    from appliance.pipeline import build_ova as run_build

    if on_error not in ("keep", "destroy"):
        raise UsageError(f"--on-error={on_error!r}: allowed values are keep and destroy")
    options = BuildOptions(
        skip=tuple(n for n in skip.split(",") if n), only=tuple(n for n in only.split(",") if n),
        force=force, on_error=on_error, boot_check=not no_boot_check,  # type: ignore[arg-type]
    )
    cfg = config_from_flags(config, set_, provider, skip_steps=skipped_steps(options))
    run_build(cfg, options)


@cli_task(help={
    "force": "Rebuild even when a box for the same inputs is cached.",
    "mirror": "Debian archive URL (default: http://deb.debian.org/debian).",
    "security_mirror": "Debian security archive URL ('' leaves security updates out).",
})
def base_box(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
             force: bool = False, mirror: str = "http://deb.debian.org/debian",
             security_mirror: str = "http://deb.debian.org/debian-security", debug: bool = False) -> None:
    """Build the minimal Debian 12 base box (vm.box) from the Debian archive and add it to Vagrant (cached)."""
    from appliance.basebox import build_base_box

    build_base_box(config_from_flags(config, set_, provider, resolve=False), force=force, mirror=mirror,
                   security_mirror=security_mirror)


@cli_task(help={"provision": "Also run Vagrant's shell provisioners (default: boot only)."})
def up(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
       provision: bool = False, debug: bool = False) -> None:
    """Render the Vagrantfile into build/vm and boot the VM with Vagrant (building the base box when missing)."""
    from appliance.vagrant import up as vagrant_up

    vagrant_up(config_from_flags(config, set_, provider), provision=provision, render_first=True, build_box=True)


@cli_task(help={"force": "Power the VM off instead of shutting it down cleanly."})
def halt(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
         force: bool = False, debug: bool = False) -> None:
    """Shut the build VM down (vagrant halt)."""
    from appliance.vagrant import halt as vagrant_halt

    vagrant_halt(config_from_flags(config, set_, provider), force=force)


@cli_task()
def destroy(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
            debug: bool = False) -> None:
    """Remove the build VM, its disks and its build state (published OVAs are kept)."""
    from appliance.pipeline import destroy_build

    destroy_build(config_from_flags(config, set_, provider))


@cli_task()
def status(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
           debug: bool = False) -> None:
    """Print the build VM's state (vagrant status --machine-readable)."""
    from appliance.vagrant import status as vagrant_status

    st = vagrant_status(config_from_flags(config, set_, provider))
    print(f"{st.name}\t{st.state}\t{st.provider}")


@cli_task(help={
    "path": "The OVA to verify.",
    "no_boot": "Structural checks only (tar, order, manifest, schema, disk); no boot.",
    "ssh_key": "Private key for the boot check's login (default: ssh.private_key, else the base box's key).",
    "http": "Always check HTTP on the forwarded port (default: when the image's status line says CSGHub is installed).",
    "no_http": "Never check HTTP.",
    "no_fetch": "Do not download the pinned OVF schemas when they are not cached (the schema check then does "
                "not run, and the summary says so).",
}, auto_shortflags=False)
def verify_ova(c: Context, path: str, config: str | None = None, set_: list[str] | None = None,
               provider: str | None = None, no_boot: bool = False, ssh_key: str | None = None,
               http: bool = False, no_http: bool = False, no_fetch: bool = False, debug: bool = False) -> None:
    """Verify an OVA: structure, manifest digests, OVF schema and disk, then boot a fresh copy."""
    from pathlib import Path

    from appliance.verify import verify_from_config

    verify_from_config(config_from_flags(config, set_, provider, resolve=False), Path(path), boot=not no_boot,
                       ssh_key=ssh_key, http=True if http else (False if no_http else None),
                       fetch_schemas=not no_fetch)


@cli_task(help={"update_lock": "Also record the verified digests in the version lock (same as `invoke lock`).",
                "bundle": "Then write the whole cache into this one file, for a build host without internet.",
                "from_bundle": "First verify this bundle (`--bundle`) and place its files in the cache."})
def fetch(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
          update_lock: bool = False, bundle: str | None = None, from_bundle: str | None = None,
          debug: bool = False) -> None:
    """Download k3s, its air-gap images, the CSGHub chart, helm, the OVF schemas and the pinned container
    images into the cache, verified (resumes)."""
    from pathlib import Path

    from appliance.artifacts import fetch_artifacts, fetch_helm, fetch_ovf_schemas

    cfg = config_from_flags(config, set_, provider, resolve=False)
    if from_bundle:
        from appliance.bundle import read_bundle

        read_bundle(cfg, Path(from_bundle))
    fetch_artifacts(cfg, update_lock=update_lock)
    fetch_helm(cfg, update_lock=update_lock)
    fetch_ovf_schemas(cfg)
    if "csghub" not in cfg.provision.skip:
        from appliance.imagecache import fetch_image_set
        from appliance.images import write_build_image_list

        write_build_image_list(cfg)
        fetch_image_set(cfg, required=False)
    if bundle:
        from appliance.bundle import write_bundle

        write_bundle(cfg, Path(bundle))


@cli_task(help={"images": "Also ask the registries what each image's tag points to now (linux/amd64) and pin "
                          "those digests (skopeo; mirrors and credentials as `invoke fetch` uses them)."})
def lock(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
         images: bool = False, debug: bool = False) -> None:
    """Fetch and verify the artifacts, then pin their sha256 digests (and the image digests the last build
    recorded, or with --images those the registries answer) in appliance/data/versions.lock.yaml."""
    from appliance.artifacts import fetch_artifacts, fetch_helm
    from appliance.images import pin_recorded_images

    cfg = config_from_flags(config, set_, provider, resolve=False)
    fetch_artifacts(cfg, update_lock=True)
    fetch_helm(cfg, update_lock=True)
    if images:
        from appliance.imagecache import lock_image_set

        lock_image_set(cfg)
    else:
        pin_recorded_images(cfg)


@cli_task(help={"output": "Write the values to this file instead of printing them."})
def values(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
           output: str | None = None, debug: bool = False) -> None:
    """Print the Helm values CSGHub is installed with (usable with `helm install -f` anywhere)."""
    from appliance.values import emit_values

    path = emit_values(config_from_flags(config, set_, provider, resolve=False), output)
    if path is not None:
        log.success(f"wrote {path}")


@cli_task(help={
    "only": "Run just this step (by name, e.g. base), whatever its marker says.",
    "from": "Run this step and every later one, whatever their markers say.",
    "force": "Run every step, ignoring the markers on the guest.",
    "list": "Show the plan (each step: run or skip, and why); change nothing.",
    "skip": "Comma-separated steps to skip (added to provision.skip).",
})
def provision(c: Context, config: str | None = None, set_: list[str] | None = None, provider: str | None = None,
              only: str | None = None, from_: str | None = None, force: bool = False, list_: bool = False,
              skip: str = "", debug: bool = False) -> None:
    """Provision the running VM over SSH: run the steps that changed or never ran; resume after a failure."""
    from appliance.steps import Options, provision_vagrant_vm

    names = [n.strip() for n in skip.split(",") if n.strip()]
    cfg = config_from_flags(config, set_, provider, skip_steps=names)
    options = Options(only=only, from_step=from_, force=force, skip=tuple(names))
    provision_vagrant_vm(cfg, options, list_plan=list_)
