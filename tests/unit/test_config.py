"""Configuration layering and validation, driven by tests/data/config_cases.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from appliance.config import ApplianceConfig, load_config, parse_set
from appliance.errors import ConfigError
from appliance.guest import guest_environment

DATA = Path(__file__).resolve().parent.parent / "data"
CASES = yaml.safe_load((DATA / "config_cases.yaml").read_text())
ROOT = Path(__file__).resolve().parents[2]


def _get(cfg: ApplianceConfig, dotted: str) -> Any:
    node: Any = cfg.model_dump(mode="python")
    for part in dotted.replace("[", ".[").split("."):
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    return node


def _load(case: dict[str, Any], tmp_path: Path) -> ApplianceConfig:
    config_file = None
    if "file" in case or "file_parts" in case:
        config_file = tmp_path / "appliance.yaml"
        body = case["file"] if "file" in case else "".join(text * times for text, times in case["file_parts"])
        config_file.write_text(body)
    return load_config(config_file, case.get("sets", []), case.get("provider"), cwd=tmp_path,
                       skip_steps=case.get("skip_steps", ()))


@pytest.mark.parametrize("case", CASES["good"], ids=[c["name"] for c in CASES["good"]])
def test_good_config(case: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.log import log

    warned: list[str] = []
    monkeypatch.setattr(log, "warning", lambda msg, *args: warned.append(msg))
    cfg = _load(case, tmp_path)
    for key, expected in case["expect"].items():
        assert _get(cfg, key) == expected, key
    # `warnings`: [key, fragment] pairs, each a warning that names the key; exactly that many.
    expected_warnings = case.get("warnings", [])
    if expected_warnings:
        assert len(warned) == len(expected_warnings), warned
    for key, fragment in expected_warnings:
        assert any(w.startswith(f"{key}: ") and fragment in w for w in warned), (key, warned)


@pytest.mark.parametrize("case", CASES["bad"], ids=[c["name"] for c in CASES["bad"]])
def test_bad_config_reports_every_problem(case: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(case, tmp_path)
    problems = info.value.problems
    assert len(problems) == len(case["errors"]), "\n".join(map(str, problems))
    text = str(info.value)
    for key, fragment, *source in case["errors"]:
        # key_prefix: the exact key path depends on where a walk stopped (inside an alias bomb).
        matching = [p for p in problems if p.key == key or (case.get("key_prefix") and p.key.startswith(key))]
        assert matching, f"no problem for key {key!r} in:\n{text}"
        assert any(fragment in p.message for p in matching), f"{fragment!r} not in {matching}"
        if source:
            expected = str(tmp_path / "appliance.yaml") if source[0] == "file" else source[0]
            assert any(p.source == expected for p in matching), f"source {expected!r} not in {matching}"
    assert info.value.exit_code == 2
    assert "Traceback" not in text


def test_problem_names_its_source(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text("vm: {cpus: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, ["libvirt.driver=xen"])
    by_key = {p.key: p for p in info.value.problems}
    assert by_key["vm.cpus"].source == str(f)
    assert by_key["libvirt.driver"].source == "--set"
    assert "vm.cpus = 0" in str(by_key["vm.cpus"])


def test_unreadable_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml", ["vm.cpus=x"])
    messages = [str(p) for p in info.value.problems]
    assert any("cannot read the config file" in m for m in messages)
    assert any("vm.cpus" in m for m in messages), "other layers are still checked"


def test_appliance_yaml_in_cwd_is_read(tmp_path: Path) -> None:
    (tmp_path / "appliance.yaml").write_text("vm: {cpus: 5}\n")
    assert load_config(None, [], cwd=tmp_path).vm.cpus == 5


def test_config_is_frozen() -> None:
    cfg = load_config(None, [], cwd=Path("/"))
    with pytest.raises(ValidationError, match="frozen"):
        cfg.vm.cpus = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("expr", "path", "value"),
    [
        ("a.b=1", ["a", "b"], 1),
        ("a=true", ["a"], True),
        ("a=", ["a"], ""),
        ("a={x,y}", ["a"], ["x", "y"]),
        ("a={}", ["a"], []),
        ("a=[1, 2]", ["a"], [1, 2]),
        ("a.b[2].c=on", ["a", "b", 2, "c"], True),
        ("a=x=y", ["a"], "x=y"),
        ("a=1.10", ["a"], "1.10"),
        ("a=null", ["a"], None),
    ],
)
def test_parse_set(expr: str, path: list[Any], value: Any) -> None:
    assert parse_set(expr) == (path, value)


def test_guest_environment_holds_marked_settings_quoted() -> None:
    cfg = load_config(None, ["k3s.extra_args=[--a=1, 'b c']"], cwd=Path("/"))
    env = guest_environment(cfg)
    assert env["K3S_EXTRA_ARGS"] == "--a=1 'b c'"
    assert env["CSGHUB_EDITION"] == "ce"
    assert env["APPLIANCE_VERSION"] == cfg.csghub.chart_version
    assert list(env) == sorted(env)


def _invoke(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_bad_config_exits_2_with_all_problems() -> None:
    proc = _invoke("config", "--set", "vm.cpus=0", "--set", "vm.bogus=1", "--set", "oops")
    assert proc.returncode == 2, proc.stderr
    assert "invalid configuration (3 problems)" in proc.stderr
    assert "vm.cpus = 0" in proc.stderr and "vm.bogus: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_render_bad_config_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "Vagrantfile"
    proc = _invoke("render", "--provider", "libvirt", "--set", "vm.memory_mb=100", "--output", str(out))
    assert proc.returncode == 2
    assert not out.exists()


def test_cli_config_prints_resolved_yaml() -> None:
    proc = _invoke("config", "--provider", "libvirt", "--set", "vm.cpus=6")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["provider"] == "libvirt" and data["vm"]["cpus"] == 6


def test_cli_list_shows_tasks_with_help() -> None:
    proc = _invoke("--list")
    assert proc.returncode == 0, proc.stderr
    for name in ("config", "render", "doctor"):
        line = next((ln for ln in proc.stdout.splitlines() if ln.strip().startswith(name + " ")), "")
        assert line.split(maxsplit=1)[1:], f"task {name} has no one-line help in:\n{proc.stdout}"


def test_cli_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    bomb = next(c for c in CASES["bad"] if c["name"].startswith("billion laughs"))["file"]
    (tmp_path / "bomb.yaml").write_text(bomb)
    proc = _invoke("config", "--config", str(tmp_path / "bomb.yaml"))
    assert proc.returncode == 2, proc.stderr
    assert "expands to more than 100000 values" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_skip_on_the_command_line_counts_like_provision_skip() -> None:
    # The run must stop at the configuration (the bad build_dir), and the CPU count must not be
    # among its problems: --skip k3s,csghub lifts CSGHub's minimum as provision.skip does.
    proc = _invoke("build-ova", "--provider", "libvirt", "--skip", "k3s,csghub", "--set", "vm.cpus=2",
                   "--set", "output.build_dir=")
    assert proc.returncode == 2, proc.stderr
    assert "invalid configuration (1 problem)" in proc.stderr
    assert "output.build_dir" in proc.stderr and "minimum" not in proc.stderr
    proc = _invoke("build-ova", "--provider", "libvirt", "--skip", "firstboot", "--set", "vm.cpus=2",
                   "--set", "output.build_dir=")
    assert proc.returncode == 2 and "below CSGHub's minimum of 4 CPUs" in proc.stderr


def test_a_problem_shows_the_value_as_yaml_reads_it(tmp_path: Path) -> None:
    """`--set output.build_dir=~` is YAML's null: the message says null, not Python's None."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["output.build_dir=~", "vm.cpus=yes"], cwd=tmp_path)
    text = str(err.value)
    assert "output.build_dir = null:" in text and "vm.cpus = true:" in text
    assert "None" not in text and "True" not in text


@pytest.mark.parametrize("how", ["set", "file"])
def test_cli_binary_value_exits_2_naming_the_key(tmp_path: Path, how: str) -> None:
    """`!!binary` used to end in a UnicodeDecodeError traceback from model_dump (issue 21)."""
    (tmp_path / "bin.yaml").write_text("csghub:\n  values:\n    a: !!binary /w==\n")
    args = ["--set", "csghub.values.a=!!binary /w=="] if how == "set" else ["--config", str(tmp_path / "bin.yaml")]
    proc = _invoke("config", *args)
    assert proc.returncode == 2, proc.stderr
    assert "csghub.values.a" in proc.stderr and "!!binary" in proc.stderr and "Traceback" not in proc.stderr
