"""The guest contract lives in the steps' headers: host code never names a step.

The provisioning scripts declare what they need (``# appliance: needs=``, ``stack``, ``final``,
``env=``; docs/provisioning.md). These tests keep it so: host code holds no step name as a string
literal, and a new step that declares a need receives it without any host code change.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from appliance.artifacts import host_needs, planned_artifacts
from appliance.config import PROJECT_ROOT, ApplianceConfig, load_config
from appliance.guest import NEEDS
from appliance.render import Upload, vagrant_steps
from appliance.scripts import PROVISION_DIR, declared_needs, discover_scripts, stack_enabled_for
from appliance.steps import pinned_uploads

APPLIANCE = PROJECT_ROOT / "appliance"

# Where a string equal to a step name means something else. Key: (file, scope, text), the scope being
# the innermost function or class, or the module-level name assigned. Each entry says what it is.
NOT_A_STEP: dict[tuple[str, str, str], str] = {
    ("artifacts.py", "K3S_GROUP", "k3s"): "the version lock's section and cache folder of k3s's files",
    ("artifacts.py", "K3S_FILES", "k3s"): "the k3s binary's file name in a k3s release",
    ("artifacts.py", "CHART_NAME", "csghub"): "the chart's name in its repository's index.yaml",
    ("config.py", "VMSettings", "csghub"): "the default guest hostname",
    ("config.py", "OutputSettings", "csghub"): "the default file name stem of the OVA",
    ("config.py", "_chart_credentials", "csghub"): "the `csghub` section of the settings",
    ("images.py", "runtime_images", "csghub"): "the Helm release name",
    ("images.py", "image_set", "csghub"): "the Helm release name",
    ("images.py", "helm_template", "csghub"): "the Helm release name and namespace",
    ("manifests.py", "RELEASE_NAME", "csghub"): "the Helm release name",
    ("manifests.py", "RELEASE_NAMESPACE", "csghub"): "the Kubernetes namespace of the release",
    ("manifests.py", "REDIS_POD_LABELS", "csghub"): "the app.kubernetes.io/name label of CSGHub's pods",
    ("manifests.py", "coredns_custom_object", "base"): "the chart's base hostname (appliance.values.chart_hostnames)",
    ("values.py", "chart_hostnames", "base"): "the chart's base hostname",
    ("pipeline.py", "STAGES", "seal"): "the name of the build stage that runs the final step",
    ("pipeline.py", "build_report", "k3s"): "build-report.json's key for the k3s version",
}


def step_names() -> set[str]:
    return {s.name for s in discover_scripts()}


def _docstrings(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def step_name_literals(path: Path, names: set[str]) -> list[tuple[int, str, str]]:
    """(line, scope, text) of every string constant in ``path`` equal to a step name; docstrings
    and comments do not count."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, scope: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = node.name
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names \
                and id(node) not in docs:
            found.append((node.lineno, scope, node.value))
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    for statement in tree.body:
        scope = "<module>"
        if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
            scope = statement.targets[0].id
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            scope = statement.target.id
        visit(statement, scope)
    return found


def test_host_code_names_no_step() -> None:
    """appliance/ and tasks.py: the command line takes step names as users type them, from the scripts."""
    names = step_names()
    assert {"k3s", "csghub", "seal"} <= names  # the check below must have names to look for
    offending, used = [], set()
    for path in [*sorted(APPLIANCE.rglob("*.py")), PROJECT_ROOT / "tasks.py"]:
        relative = path.relative_to(APPLIANCE).as_posix() if path.is_relative_to(APPLIANCE) else "../tasks.py"
        for line, scope, text in step_name_literals(path, names):
            if (relative, scope, text) in NOT_A_STEP:
                used.add((relative, scope, text))
            else:
                offending.append(f"appliance/{relative}:{line} ({scope}): {text!r}")
    assert not offending, (
        "host code names a provisioning step; declare what the step needs in its `# appliance:` header "
        "instead (docs/provisioning.md), or, if the text means something else, add it to NOT_A_STEP "
        "with what it is:\n  " + "\n  ".join(offending))
    assert used == set(NOT_A_STEP), f"stale NOT_A_STEP entries: {sorted(set(NOT_A_STEP) - used)}"


def test_the_scan_finds_a_planted_step_name(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text('"""Mentions csghub in a docstring: fine."""\n# and k3s in a comment\n'
                       'def f(skip):\n    return "csghub" not in skip\n')
    assert step_name_literals(planted, step_names()) == [(4, "f", "csghub")]


def test_every_need_has_a_host_provider_and_a_documented_name() -> None:
    from appliance.needs import _PROVIDERS

    assert set(_PROVIDERS) == set(NEEDS)
    docs = (PROJECT_ROOT / "docs" / "provisioning.md").read_text(encoding="utf-8")
    assert all(f"`{need}`" in docs for need in NEEDS)
    declared = {n for s in discover_scripts() for n in s.needs}
    assert declared == set(NEEDS), "every need is declared by a step of provision/"


def test_every_guest_variable_is_a_setting_or_derived() -> None:
    """The guest environment is declared in appliance.guest, not in the settings model: each name
    maps to a real setting (a typo fails here) and only those and the derived ones reach a step."""
    from appliance.guest import DERIVED_VARIABLES, SETTING_VARIABLES, guest_environment, setting_value
    from appliance.scripts import guest_variable_names

    cfg = load_config(None, ["csghub.domain=hub.example", "k3s.extra_args={--a,b c}"], cwd=Path("/"))
    env = guest_environment(cfg)
    for name, key in SETTING_VARIABLES.items():
        section, _, field = key.rpartition(".")
        model = setting_value(cfg, section) if section else cfg
        assert field in type(model).model_fields, f"{name}: {key} is not a setting"
    assert env["CSGHUB_DOMAIN"] == "hub.example" and env["K3S_EXTRA_ARGS"] == "--a 'b c'"
    assert set(env) == set(SETTING_VARIABLES) | set(DERIVED_VARIABLES)
    assert guest_variable_names() == set(env) | {"PROVISION_DIR"}


# -- a new step declaring a need gets it, no host code changed ---------------------------------


EXTRA = """#!/bin/bash
# A step the host code has never heard of: it reads the chart archive.
# appliance: needs=chart
# appliance: env=CSGHUB_CHART_VERSION
# appliance: stack
set -euo pipefail
test -s "/var/cache/csghub-appliance/artifacts/csghub-$CSGHUB_CHART_VERSION.tgz"
"""


@pytest.fixture
def steps_with_extra(tmp_path: Path) -> Path:
    directory = tmp_path / "provision"
    shutil.copytree(PROVISION_DIR, directory)
    (directory / "35-extra.sh").write_text(EXTRA)
    return directory


def _cached(tmp_path: Path, *sets: str) -> ApplianceConfig:
    cfg = load_config(None, [f"artifacts.cache_dir={tmp_path / 'cache'}", f"output.build_dir={tmp_path / 'build'}",
                             "provider=libvirt", *sets], cwd=tmp_path)
    for artifact in planned_artifacts(cfg):  # stand-ins: nothing here reads them but their digest
        artifact.cache_path.parent.mkdir(parents=True, exist_ok=True)
        artifact.cache_path.write_bytes(b"stand-in " + artifact.name.encode())
    return cfg


def test_a_new_step_that_declares_a_need_receives_it(steps_with_extra: Path, tmp_path: Path) -> None:
    """With the csghub step skipped, only the new step needs the chart: it is fetched, uploaded and
    hashed into that step's marker (render and runner share step_inputs), and nowhere else."""
    cfg = _cached(tmp_path, "provision.skip=[csghub]")
    needs = declared_needs(cfg.provision.skip, steps_with_extra)
    assert needs == {"k3s-binary", "k3s-images", "chart"}
    assert "chart" not in declared_needs(cfg.provision.skip)  # without the new step: no chart at all
    assert {a.name for a in planned_artifacts(cfg) if a.need in host_needs(needs)} == {
        "k3s", "k3s-airgap-images-amd64.tar.zst", "csghub-2.4.0.tgz"}

    uploads = pinned_uploads(cfg, directory=steps_with_extra)
    chart_guest = "/var/cache/csghub-appliance/artifacts/csghub-2.4.0.tgz"
    assert [(up.need, up.guest) for up in uploads if up.need == "chart"] == [("chart", chart_guest)]
    assert not any(up.need in ("manifests", "image-set") for up in uploads)
    rendered = [Upload(f"{i:02d}-{up.local.name}", str(up.local), up.guest,
                       hashlib.sha256(up.local.read_bytes()).hexdigest(), up.need) for i, up in enumerate(uploads)]
    steps = {s.name: s for s in vagrant_steps(cfg, steps_with_extra, rendered)}
    assert list(steps) == ["base", "k3s", "extra", "firstboot"]  # csghub skipped, seal never in a Vagrantfile
    marker = json.loads(steps["extra"].env["APPLIANCE_STEP_MARKER"])
    chart_digest = hashlib.sha256((tmp_path / "cache" / "charts" / "csghub-2.4.0.tgz").read_bytes()).hexdigest()
    assert marker["inputs"][f"upload:{chart_guest}"] == chart_digest
    assert sorted(k for k in marker["inputs"] if k.startswith("env:")) == ["env:CSGHUB_CHART_VERSION",
                                                                         "env:PROVISION_DIR"]
    k3s_marker = json.loads(steps["k3s"].env["APPLIANCE_STEP_MARKER"])
    assert f"upload:{chart_guest}" not in k3s_marker["inputs"]
    assert not any(k.startswith("upload:") for k in json.loads(steps["base"].env["APPLIANCE_STEP_MARKER"])["inputs"])


def test_a_new_stack_step_skipped_means_a_vm_without_csghub(steps_with_extra: Path) -> None:
    assert stack_enabled_for([], steps_with_extra)
    assert not stack_enabled_for(["extra"], steps_with_extra)
    assert stack_enabled_for(["extra"])  # the checkout's own steps know no `extra`
    assert not stack_enabled_for(["k3s"], steps_with_extra)


def test_skipping_every_step_that_needs_something_needs_nothing(tmp_path: Path) -> None:
    cfg = _cached(tmp_path, "provision.skip=[k3s, csghub]", "vm.memory_mb=2048", "vm.cpus=2")
    assert declared_needs(cfg.provision.skip) == frozenset()
    assert pinned_uploads(cfg) == []
    assert not cfg.stack_enabled


@pytest.mark.parametrize(("header", "message"), [
    ("needs=chart,helm", r"20-x.sh: `# appliance: needs=` names 'helm', which is not a need"),
    ("needs=", r"20-x.sh: `# appliance: needs=` lists an empty need name"),
    ("uploads", r"20-x.sh: .*`uploads` is gone: declare what the script reads with `needs=`"),
    ("stack=yes", r"20-x.sh: .*`stack` takes no value"),
    ("final=1", r"20-x.sh: .*`final` takes no value"),
    ("timeout=soon", r"20-x.sh: .*`timeout` takes a whole number of seconds, not 'soon'"),
    ("files=", r"20-x.sh: .*`files` needs a value"),
    ("seal", r"20-x.sh: .*unknown key `seal`"),
])
def test_a_header_line_the_runner_cannot_take_is_refused(tmp_path: Path, header: str, message: str) -> None:
    from appliance.errors import UsageError

    (tmp_path / "20-x.sh").write_text(f"#!/bin/bash\n# appliance: {header}\ntrue\n")
    with pytest.raises(UsageError, match=message) as err:
        discover_scripts(tmp_path)
    assert re.search(r"header keys: final, reboot-after, stack|known: |comma-separated", str(err.value))  # the fix


def test_the_seal_stage_runs_the_step_that_declares_final(steps_with_extra: Path) -> None:
    from appliance.errors import UsageError
    from appliance.pipeline import final_step

    assert final_step() == "seal" == final_step(steps_with_extra)
    (steps_with_extra / "95-wipe.sh").write_text("#!/bin/bash\n# appliance: final\ntrue\n")
    with pytest.raises(UsageError, match=r"provision/ has 2 \(seal, wipe\): cannot seal the VM"):
        final_step(steps_with_extra)
    for name in ("90-seal.sh", "95-wipe.sh"):
        (steps_with_extra / name).unlink()
    with pytest.raises(UsageError, match=r"provision/ has 0 \(none\)"):
        final_step(steps_with_extra)
