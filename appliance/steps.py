"""The provision stage: run ``provision/NN-name.sh`` on the guest, in order, and remember them.

Think ``make``, not Packer's start-over:

- After a step succeeds, a marker on the guest (``<state dir>/<name>.done``, JSON) records
  the sha256 of its inputs: the script, its support files, each environment variable
  it declares (``# appliance: env=...``) and so receives (hashed, so values never land on
  disk), and each file of the needs it declares (``# appliance: needs=...``). Like mkosi's
  cache manifest, the list of inputs is explicit and sorted. The marker's content is computed
  here once; the guest-side wrapper
  ``provision/files/common/run-step.sh`` writes it when the step succeeds, for this runner
  and for the rendered Vagrantfile's shell provisioners alike.
- A rerun skips steps that are done and unchanged, re-runs a changed step (saying which
  inputs changed) and every step after it, and resumes at the step that failed (its marker
  was removed before it started, together with the markers of every later step).
- Each step: upload the script and its files, run it with sudo and its inputs as
  environment variables, stream each line to the console and to ``build/logs/<name>.log``,
  under a timeout, exit status checked. Outcomes: changed, no changes (no ``changed:`` line),
  skipped (marker or config), failed, failed after partial changes.
- A step that declares ``# appliance: reboot-after`` reboots the guest; the runner waits
  for a new boot id and carries on. A connection lost mid-step is re-established and the
  step (idempotent by contract) re-run, ``provision.reconnect_attempts`` times at most.

Entry points: :func:`provision` and :func:`plan` (for ``invoke provision --list``).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO

from appliance.config import ApplianceConfig
from appliance.digest import sha256_file
from appliance.errors import ArtifactError, ConnectionLost, RemoteCommandFailed, StepFailed, UsageError
from appliance.guest import guest_environment
from appliance.log import log
from appliance.needs import GuestUpload
from appliance.scripts import (
    GUEST_PROVISION_DIR,
    PROVISION_DIR,
    PROVISION_DIR_VARIABLE,
    ProvisionScript,
    declared_needs,
    discover_scripts,
)
from appliance.ssh import RemoteSession, SSHEndpoint
from appliance.upload import ensure_remote_dir, remote_sha256, upload_file, upload_files

DEFAULT_STATE_DIR = "/var/lib/csghub-appliance/steps"
# Where markers live on the guest; tests against a loopback sshd point it somewhere harmless.
STATE_DIR_ENV = "APPLIANCE_STATE_DIR"
TAIL_LINES = 30
REBOOT_TIMEOUT = 900
MARKER_FORMAT = 1
# The guest-side wrapper every step runs under; it writes the step's marker on success.
STEP_WRAPPER = "files/common/run-step.sh"
_FINAL = re.compile(r"^#\s*appliance:\s*final\s*$")
FINAL_ONLY = "final step (seals the VM): runs only when named with --only, as the seal stage does"
SKIPPED_BY_CONFIG = "skipped by configuration (provision.skip, --skip)"


# -- what a step depends on -------------------------------------------------------------------


@dataclass(frozen=True)
class StepInputs:
    """The explicit, sorted inputs of one step: ``script``, ``file:<path>``, ``env:<NAME>`` -> sha256."""

    step: str
    inputs: dict[str, str]

    @property
    def digest(self) -> str:
        return _sha256_text(json.dumps(self.inputs, sort_keys=True))

    def marker_body(self) -> str:
        """The marker as one JSON object without its timing; ``run-step.sh`` adds ``finished`` and
        ``seconds`` when the step succeeded and writes it (one line)."""
        return json.dumps(
            {
                "format": MARKER_FORMAT,
                "step": self.step,
                "digest": self.digest,
                "inputs": dict(sorted(self.inputs.items())),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def wrapper_env(self, state_dir: str) -> dict[str, str]:
        """What ``run-step.sh`` needs to leave this marker in ``state_dir`` (it removes these
        variables before the step runs)."""
        return {"APPLIANCE_STEP_MARKER": self.marker_body(),
                "APPLIANCE_STEP_MARKER_FILE": f"{state_dir.rstrip('/')}/{self.step}.done"}

    def changes_from(self, recorded: dict[str, str]) -> list[str]:
        """Which inputs differ from a marker's, by name (``script``, ``file:...``, ``env:NAME``)."""
        names = sorted(set(self.inputs) | set(recorded))
        out = []
        for name in names:
            if name not in recorded:
                out.append(f"{name} (new)")
            elif name not in self.inputs:
                out.append(f"{name} (gone)")
            elif recorded[name] != self.inputs[name]:
                out.append(name)
        return out


def is_final(script: ProvisionScript) -> bool:
    """``# appliance: final``: the step ends the VM's life as a build machine (seal). Afterwards
    nothing may be written to the guest and nothing reconnects: no marker, no reboot, no retry."""
    declared = getattr(script, "final", None)
    if isinstance(declared, bool):
        return declared
    header = script.path.read_text(encoding="utf-8").splitlines()[:40]
    return any(_FINAL.match(line.strip()) for line in header)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def support_files(script: ProvisionScript, directory: Path) -> list[tuple[Path, str]]:
    """``(local file, path relative to the guest provision dir)`` for every ``files=DIR`` of a script."""
    out: list[tuple[Path, str]] = []
    for name in script.files:
        base = directory / "files" / name
        if not base.is_dir():
            raise UsageError(
                f"{script.filename} declares files={name}, but {base} is not a directory",
                hint=f"create {base} or remove the `# appliance: files={name}` line",
            )
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            out.append((path, f"files/{name}/{path.relative_to(base).as_posix()}"))
    return out


def step_environment(script: ProvisionScript, env: Mapping[str, str]) -> dict[str, str]:
    """The variables ``script`` receives: those it declares with ``env=`` and ``PROVISION_DIR``."""
    wanted = set(script.env) | {PROVISION_DIR_VARIABLE}
    return {name: value for name, value in sorted(env.items()) if name in wanted}


def step_inputs(
    script: ProvisionScript, env: Mapping[str, str], directory: Path,
    uploads: Mapping[str, Mapping[str, str]] | None = None,
) -> StepInputs:
    """The step's inputs: its script, support files, the variables it declares (out of ``env``)
    and the files of the needs it declares (``uploads``: need -> guest path -> sha256)."""
    inputs = {"script": sha256_file(script.path)}
    for local, relative in support_files(script, directory):
        inputs[f"file:{relative}"] = sha256_file(local)
    for name, value in step_environment(script, env).items():
        inputs[f"env:{name}"] = _sha256_text(value)
    for need in script.needs:
        for guest_path, digest in (uploads or {}).get(need, {}).items():
            inputs[f"upload:{guest_path}"] = digest
    return StepInputs(script.name, dict(sorted(inputs.items())))


def digests_by_need(uploads: Sequence[tuple[str, str, str]]) -> dict[str, dict[str, str]]:
    """``(need, guest path, sha256)`` triples as :func:`step_inputs` takes them."""
    out: dict[str, dict[str, str]] = {}
    for need, guest, digest in uploads:
        out.setdefault(need, {})[guest] = digest
    return out


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedStep:
    script: ProvisionScript
    run: bool
    reason: str
    inputs: StepInputs | None = None

    @property
    def name(self) -> str:
        return self.script.name


class StepOutcome(StrEnum):
    """How a provisioning step ended (docs/provisioning.md, "Outcomes")."""

    CHANGED = "changed"
    NO_CHANGES = "no changes"
    SKIPPED = "skipped"
    FAILED = "failed"
    FAILED_PARTIAL = "failed after partial changes"


@dataclass
class StepReport:
    name: str
    outcome: StepOutcome
    reason: str
    seconds: float = 0.0
    changes: list[str] = field(default_factory=list)
    log_path: str | None = None
    attempts: int = 0


@dataclass
class ProvisionReport:
    steps: list[StepReport]
    seconds: float


@dataclass(frozen=True)
class Options:
    only: str | None = None
    from_step: str | None = None
    force: bool = False
    skip: tuple[str, ...] = ()


def resolve_state_dir(state_dir: str | None) -> str:
    chosen = state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    if not chosen.startswith("/"):
        raise UsageError(f"the marker directory must be an absolute guest path, not {chosen!r}")
    return chosen.rstrip("/") or "/"


class Provisioner:
    """Runs the steps of one provisioning over one session. ``provision()``/``plan()`` wrap it."""

    def __init__(
        self,
        cfg: ApplianceConfig,
        session: RemoteSession,
        *,
        directory: Path = PROVISION_DIR,
        state_dir: str | None = None,
        reboot_timeout: float = REBOOT_TIMEOUT,
        guest_dir: str = GUEST_PROVISION_DIR,
        uploads: Sequence[GuestUpload] = (),
    ) -> None:
        self.cfg = cfg
        self.session = session
        self.directory = directory
        self.state_dir = resolve_state_dir(state_dir)
        # Where a running step records its process group (root-owned, beside the markers).
        self.group_file = f"{self.state_dir}/running-step.pgid"
        self.reboot_timeout = reboot_timeout
        self.log_dir = cfg.build_dir / "logs"
        self.guest_dir = guest_dir
        self.env = {**guest_environment(cfg), "PROVISION_DIR": guest_dir}
        # What the steps need from the host (artifacts, manifests, the image set), hashed once.
        self.uploads = list(uploads)
        self.upload_digests = digests_by_need([(up.need, up.guest, sha256_file(up.local)) for up in self.uploads])
        self.installed_needs: set[str] = set()

    # -- planning -----------------------------------------------------------------------

    def scripts(self) -> list[ProvisionScript]:
        scripts = discover_scripts(self.directory)
        if not scripts:
            raise UsageError(f"no provisioning scripts (NN-name.sh) in {self.directory}")
        return scripts

    def read_markers(self) -> dict[str, dict[str, object]]:
        """Every marker on the guest, by step name (unreadable ones are treated as absent)."""
        state = shlex.quote(self.state_dir)
        result = self.session.run(
            f"for f in {state}/*.done; do [ -f \"$f\" ] && cat \"$f\" && echo; done; true", timeout=60
        )
        markers: dict[str, dict[str, object]] = {}
        for line in result.stdout.splitlines():
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and isinstance(data.get("step"), str):
                markers[data["step"]] = data
        return markers

    def plan(self, options: Options) -> list[PlannedStep]:
        scripts = self.scripts()
        names = [s.name for s in scripts]
        skip = set(self.cfg.provision.skip) | set(options.skip)
        for flag, value in (("--only", options.only), ("--from", options.from_step)):
            if value is not None and value not in names:
                raise UsageError(f"{flag} {value!r}: no such step; steps are: {', '.join(names)}")
        for name in options.skip:
            if name not in names:
                raise UsageError(f"--skip {name!r}: no such step; steps are: {', '.join(names)}")
        if options.only and options.from_step:
            raise UsageError(
                "--only and --from cannot be combined: --only runs one step, --from a tail of them"
            )
        if options.only and options.only in skip:
            raise UsageError(f"--only {options.only!r}, but that step is skipped (provision.skip or --skip)")
        markers = self.read_markers()
        planned: list[PlannedStep] = []
        dirty: str | None = None  # the earliest step that runs: everything after it runs too
        reached_from = options.from_step is None
        for script in scripts:
            name = script.name
            if name in skip:
                planned.append(PlannedStep(script, False, SKIPPED_BY_CONFIG))
                continue
            if is_final(script) and options.only != name:
                planned.append(PlannedStep(script, False, FINAL_ONLY))
                continue
            inputs = step_inputs(script, self.env, self.directory, self.upload_digests)
            if options.only is not None:
                if name == options.only:
                    planned.append(PlannedStep(script, True, "requested with --only", inputs))
                else:
                    planned.append(PlannedStep(script, False, f"not selected (--only {options.only})"))
                continue
            if name == options.from_step:
                reached_from = True
                dirty = name
                planned.append(PlannedStep(script, True, "requested with --from", inputs))
                continue
            if not reached_from:
                planned.append(PlannedStep(script, False, f"before --from {options.from_step}"))
                continue
            if options.force:
                planned.append(PlannedStep(script, True, "--force", inputs))
                continue
            if dirty is not None:
                planned.append(PlannedStep(script, True, f"follows {dirty}, which runs", inputs))
                continue
            marker = markers.get(name)
            if marker is None:
                reason = "not done yet (no marker)"
            else:
                recorded = marker.get("inputs")
                changed = inputs.changes_from(recorded if isinstance(recorded, dict) else {})
                if not changed and marker.get("digest") == inputs.digest:
                    planned.append(PlannedStep(script, False, "done, inputs unchanged", inputs))
                    continue
                reason = "inputs changed: " + (", ".join(changed) or "marker format")
            dirty = name
            planned.append(PlannedStep(script, True, reason, inputs))
        return planned

    # -- running ------------------------------------------------------------------------

    def run(self, options: Options) -> ProvisionReport:
        started = time.monotonic()
        steps = self.plan(options)
        reports: list[StepReport] = []
        ordered = [p.script.name for p in steps]
        for index, planned in enumerate(steps):
            if not planned.run:
                log.info(f"– {planned.script.filename}: skipped ({planned.reason})")
                reports.append(StepReport(planned.name, StepOutcome.SKIPPED, planned.reason))
                continue
            # A step that runs invalidates the markers after it (they were made on top of its old
            # result), except under --only: the user asked for exactly one step.
            later = [] if options.only else ordered[index + 1:]
            reports.append(self._run_with_reconnects(planned, later))
        return ProvisionReport(reports, time.monotonic() - started)

    def _run_with_reconnects(self, planned: PlannedStep, later: Sequence[str]) -> StepReport:
        attempts = self.cfg.provision.reconnect_attempts + 1
        report = StepReport(planned.name, StepOutcome.FAILED, planned.reason, log_path=str(self._log_path(planned)))
        for attempt in range(1, attempts + 1):
            report.attempts = attempt
            try:
                self._run_step(planned, later, report, attempt)
                return report
            except ConnectionLost as exc:
                log.warning(f"{planned.script.filename}: {exc.message}")
                if is_final(planned.script):
                    raise StepFailed(
                        planned.name,
                        f"the connection dropped during the final step {planned.script.filename}; it cannot be "
                        f"re-run over SSH (it removes the build's access). Log: {report.log_path}",
                        log_path=report.log_path,
                        hint="destroy the VM and build again, or look at the VM console",
                    ) from None
                if attempt == attempts:
                    raise StepFailed(
                        planned.name,
                        f"step {planned.script.filename} lost its connection {attempts} time"
                        f"{'s' if attempts != 1 else ''}; giving up. Log: {report.log_path}",
                        log_path=report.log_path,
                        hint="check the guest's network and sshd; raise provision.reconnect_attempts "
                        "if the link is known to be flaky. A rerun resumes at this step.",
                    ) from None
                log.info(f"reconnecting to re-run {planned.script.filename} "
                         f"(attempt {attempt + 1} of {attempts})")
                self.session.reconnect()
        raise AssertionError("unreachable")  # pragma: no cover

    def _log_path(self, planned: PlannedStep) -> Path:
        return self.log_dir / f"{planned.script.path.stem}.log"

    def _timeout(self, script: ProvisionScript) -> int:
        configured = self.cfg.provision.timeouts.get(script.name)
        return configured or script.timeout or self.cfg.provision.step_timeout

    def _run_step(self, planned: PlannedStep, later: Sequence[str], report: StepReport, attempt: int) -> None:
        script, inputs = planned.script, planned.inputs
        assert inputs is not None
        timeout = self._timeout(script)
        log_path = self._log_path(planned)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        report.changes = []
        with log.step(f"{script.filename} ({planned.reason})", record=attempt == 1) as timing, \
                log_path.open("w" if attempt == 1 else "a", encoding="utf-8") as log_file:
            log_file.write(f"# {script.filename} attempt {attempt}, "
                           f"{datetime.now(UTC).isoformat(timespec='seconds')}, timeout {timeout} s\n")
            self._prepare(script, later)
            self._install_uploads(script.needs)
            started = time.monotonic()

            def on_line(stream: str, line: str) -> None:
                elapsed = time.monotonic() - started
                log.output(f"{script.name} {elapsed:6.1f}s  {line}", stderr=(stream == "stderr"))
                _log_line(log_file, elapsed, stream, line)
                if stream == "stdout" and line.startswith("changed:"):
                    report.changes.append(line.removeprefix("changed:").strip())

            final = is_final(script)
            # The wrapper writes the marker on the guest when the step succeeds (none for a final step).
            env = step_environment(script, self.env)
            if not final:
                env.update(inputs.wrapper_env(self.state_dir))
            command = shlex.join(["bash", f"{self.guest_dir}/{STEP_WRAPPER}", f"{self.guest_dir}/{script.filename}"])
            try:
                result = self.session.run(command, env=env, timeout=timeout, on_line=on_line,
                                          group_file=self.group_file)
            except RemoteCommandFailed as exc:
                report.seconds = time.monotonic() - started
                report.outcome = StepOutcome.FAILED_PARTIAL if report.changes else StepOutcome.FAILED
                timing.outcome = "failed"
                raise self._failure(script, exc, report, timeout) from None
            report.seconds = result.duration
            if final:
                # The guest is sealed: the build's key is gone and it powers off. Touch nothing more.
                self.session.close()
            report.outcome = StepOutcome.CHANGED if report.changes else StepOutcome.NO_CHANGES
            timing.outcome = "ok"
            summary = f"{len(report.changes)} change(s)" if report.changes else "no changes"
            log.info(f"{script.name}: {summary} in {result.duration:.1f} s; log: {log_path}")
        if script.reboot_after and not final:
            with log.step(f"reboot after {script.filename}"):
                self.session.reboot(timeout=self.reboot_timeout)

    def _prepare(self, script: ProvisionScript, later: Sequence[str]) -> None:
        """Invalidate this and later markers, make the upload directories, upload script and files."""
        files = support_files(script, self.directory)
        dirs = sorted({self.guest_dir, f"{self.guest_dir}/{STEP_WRAPPER.rsplit('/', 1)[0]}"} | {
            f"{self.guest_dir}/{rel.rsplit('/', 1)[0]}" for _, rel in files
        })
        # Parents before children, each made and owned by the login user so SFTP can write.
        all_dirs: set[str] = set()
        for d in dirs:
            parts = d.split("/")
            for i in range(len(self.guest_dir.split("/")), len(parts) + 1):
                all_dirs.add("/".join(parts[:i]))
        user = shlex.quote(self.session.endpoint.user)
        stale = " ".join(shlex.quote(f"{self.state_dir}/{n}.done") for n in [script.name, *later])
        # chown: files left by another uploader (Vagrant's provisioners run as root) must not
        # block SFTP, which writes as the login user.
        # A step interrupted earlier (Ctrl-C, a lost connection) may still run on the guest:
        # end it first, so two runs of a step never overlap.
        if self.session.stop_group(self.group_file):
            log.warning("stopped processes of an earlier, interrupted step that were still running")
        self.session.run(
            f"mkdir -p -- {shlex.quote(self.state_dir)} && rm -f -- {stale} && install -d -m 0755 -o {user} "
            + " ".join(shlex.quote(d) for d in sorted(all_dirs))
            + f" && chown -R {user} {shlex.quote(self.guest_dir)}",
            timeout=60,
        )
        # The wrapper comes from this checkout's provision/ even when the steps come from elsewhere.
        by_remote = {f"{self.guest_dir}/{STEP_WRAPPER}": PROVISION_DIR / STEP_WRAPPER,
                     f"{self.guest_dir}/{script.filename}": script.path}
        by_remote.update({f"{self.guest_dir}/{rel}": local for local, rel in files})
        upload_files(self.session, [(local, remote) for remote, local in by_remote.items()])

    def _install_uploads(self, needs: Sequence[str]) -> None:
        """Put the files of ``needs`` at their guest paths, each need once per run; identical files
        are not sent again.

        SFTP writes as the login user, so a changed file goes to the provision dir first and is
        then installed into its root-owned place.
        """
        wanted = [up for up in self.uploads if up.need in needs and up.need not in self.installed_needs]
        if not wanted:
            return
        present = remote_sha256(self.session, [up.guest for up in wanted], sudo=True)
        staging = f"{self.guest_dir}/uploads"
        for up in wanted:
            local, guest = up.local, up.guest
            digest = self.upload_digests[up.need][guest]
            if present.get(guest) == digest:
                log.info(f"ok: {guest} already on the guest (sha256 matches)")
                continue
            ensure_remote_dir(self.session, staging)
            staged = f"{staging}/{posixpath.basename(guest)}"
            upload_file(self.session, local, staged)
            self.session.run(
                f"install -D -m 0644 {shlex.quote(staged)} {shlex.quote(guest)} && rm -f {shlex.quote(staged)}",
                timeout=600,
            )
            log.info(f"changed: {guest} installed ({digest[:12]})")
        self.installed_needs.update(up.need for up in wanted)

    def _failure(
        self, script: ProvisionScript, exc: RemoteCommandFailed, report: StepReport, timeout: int
    ) -> StepFailed:
        result = exc.result
        if result.timed_out:
            what = f"timed out after {timeout} s"
            hint = f"raise provision.timeouts.{script.name} (or provision.step_timeout) if it needs longer"
        else:
            what = f"failed with exit status {result.exit_status}"
            hint = "fix the cause and run `invoke provision` again: it resumes at this step"
        partial = f" after {len(report.changes)} change(s)" if report.changes else ""
        tail = result.tail(TAIL_LINES)
        lines = "\n".join(f"    {line}" for line in tail) or "    (no output)"
        message = (
            f"provisioning step {script.filename} {what}{partial}.\n"
            f"  last {len(tail)} lines:\n{lines}\n"
            f"  full log: {report.log_path}"
        )
        return StepFailed(script.name, message, log_path=report.log_path, hint=hint)


def _log_line(log_file: IO[str], elapsed: float, stream: str, line: str) -> None:
    log_file.write(f"[{elapsed:7.1f}s {'err' if stream == 'stderr' else 'out'}] {line}\n")
    log_file.flush()


# -- entry points ---------------------------------------------------------------------------------


def _session(cfg: ApplianceConfig, endpoint: SSHEndpoint) -> RemoteSession:
    return RemoteSession.from_config(cfg, endpoint)


@contextmanager
def _provisioner(
    cfg: ApplianceConfig, endpoint: SSHEndpoint, directory: Path, state_dir: str | None,
    uploads: Sequence[GuestUpload],
) -> Iterator[Provisioner]:
    with _session(cfg, endpoint) as session:
        yield Provisioner(cfg, session, directory=directory, state_dir=state_dir, uploads=uploads)


def provision(
    cfg: ApplianceConfig,
    endpoint: SSHEndpoint,
    options: Options = Options(),
    *,
    directory: Path = PROVISION_DIR,
    state_dir: str | None = None,
    uploads: Sequence[GuestUpload] = (),
) -> ProvisionReport:
    """Run the steps that need running on the guest at ``endpoint``; stop at the first failure.

    ``uploads`` are the files the host provides for the steps' needs (``# appliance: needs=``,
    :func:`pinned_uploads`); each step receives, and its marker hashes, those of its own needs.
    """
    with log.step("provision"), _provisioner(cfg, endpoint, directory, state_dir, uploads) as provisioner:
        report = provisioner.run(options)
    _summarize(report)
    return report


def plan(
    cfg: ApplianceConfig,
    endpoint: SSHEndpoint,
    options: Options = Options(),
    *,
    directory: Path = PROVISION_DIR,
    state_dir: str | None = None,
    uploads: Sequence[GuestUpload] = (),
) -> list[PlannedStep]:
    """What ``provision`` would do: each step, run or skip, and why. Reads the markers; changes nothing."""
    with _provisioner(cfg, endpoint, directory, state_dir, uploads) as provisioner:
        return provisioner.plan(options)


def pinned_uploads(
    cfg: ApplianceConfig, skip: Sequence[str] = (), *, directory: Path = PROVISION_DIR
) -> list[GuestUpload]:
    """What the steps that will run need from the host (``# appliance: needs=``), each need from
    its host provider (``appliance.needs.need_uploads``); none when no such step runs.

    Raises ``ArtifactError`` when an artifact is not in the cache yet (``invoke fetch``).
    """
    from appliance.needs import guest_uploads

    uploads = guest_uploads(cfg, declared_needs(set(cfg.provision.skip) | set(skip), directory))
    missing = [str(up.local) for up in uploads if not up.local.is_file()]
    if missing:
        raise ArtifactError(f"not in the artifact cache: {', '.join(missing)}", hint="run `invoke fetch` first")
    return uploads


def describe_plan(steps: Sequence[PlannedStep]) -> Iterator[str]:
    width = max((len(p.script.filename) for p in steps), default=0)
    for p in steps:
        yield f"{p.script.filename:<{width}}  {'run ' if p.run else 'skip'}  {p.reason}"


def _summarize(report: ProvisionReport) -> None:
    counts: dict[StepOutcome, int] = {}
    for step in report.steps:
        counts[step.outcome] = counts.get(step.outcome, 0) + 1
    parts = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
    log.success(f"provisioned in {report.seconds:.1f} s: {parts or 'nothing to do'}")


def provision_vagrant_vm(
    cfg: ApplianceConfig, endpoint: SSHEndpoint, options: Options = Options(), *, list_plan: bool = False,
) -> ProvisionReport | list[PlannedStep]:
    """``invoke provision`` on the running VM at ``endpoint`` (``appliance.vm.provision`` finds it):
    show the plan (``list_plan``) or provision it."""
    uploads = pinned_uploads(cfg, options.skip)
    if list_plan:
        steps = plan(cfg, endpoint, options, uploads=uploads)
        for line in describe_plan(steps):
            print(line)
        return steps
    if options.only is not None and any(s.name == options.only and is_final(s) for s in discover_scripts()):
        return _seal_recorded(cfg, endpoint, options, uploads)
    return provision(cfg, endpoint, options, uploads=uploads)


def _seal_recorded(cfg: ApplianceConfig, endpoint: SSHEndpoint, options: Options,
                   uploads: list[GuestUpload]) -> ProvisionReport:
    """``invoke provision --only seal`` keeps the books the build's seal stage keeps.

    Without them ``state.json`` called the sealed VM unsealed, so `invoke up` or `build-ova`
    booted it again: the appliance's first boot ran inside the build VM (issue 12, item 5).
    """
    from appliance.state import BuildState, config_digest

    state = BuildState.load(cfg.build_dir)
    state.seal_started, state.config_digest = True, config_digest(cfg)
    state.provider, state.vm_name = cfg.provider, cfg.vm.name
    state.save(cfg.build_dir)  # before the step: an interrupted seal is never resumed as unsealed
    report = provision(cfg, endpoint, options, uploads=uploads)
    state.sealed = True
    state.save(cfg.build_dir)
    return report
