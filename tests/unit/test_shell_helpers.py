"""The shared shell helpers (provision/files/common/lib.sh), run for real by bash.

install_if_changed reports "changed" by its output and FILE_CHANGED, never by exit status; a
failure inside it (missing source, a target it cannot write) ends a `set -e` script with a
message naming what was wrong. Each step, library and guest tool uses this one helper, one `die`
and one `KC`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = ROOT / "provision" / "files" / "common" / "lib.sh"


def bash(snippet: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``snippet`` in a strict bash (as the steps run) after sourcing the common library."""
    return subprocess.run(["bash", "-c", f'set -euo pipefail; . "{COMMON}"; {snippet}'],
                          input=stdin, capture_output=True, text=True, timeout=30)


def test_installs_a_file_and_reports_changed_only_when_it_changed(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "sub" / "dest"
    src.write_text("one\n")
    run = f'install_if_changed "{src}" "{dest}" 0640; echo "flag=$FILE_CHANGED"'
    first = bash(run)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"changed: installed {dest}\nflag=yes\n"
    assert dest.read_text() == "one\n" and dest.stat().st_mode & 0o777 == 0o640
    again = bash(run)
    assert again.stdout == f"ok: {dest} up to date\nflag=no\n"
    dest.chmod(0o644)  # same content, wrong mode: changed
    assert bash(run).stdout == f"changed: installed {dest}\nflag=yes\n"
    assert dest.stat().st_mode & 0o777 == 0o640
    src.write_text("two\n")  # new content: changed
    assert bash(run).stdout.endswith("flag=yes\n") and dest.read_text() == "two\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest"]  # no temporary file left


def test_stdin_through_a_pipe_reaches_the_callers_flag(tmp_path: Path) -> None:
    """`producer | install_if_changed - ...`: the flag survives the pipeline (lastpipe)."""
    dest = tmp_path / "issue"
    run = f'printf "a\\nb\\n" | install_if_changed - "{dest}" 0600; echo "flag=$FILE_CHANGED"'
    assert bash(run).stdout == f"changed: wrote {dest}\nflag=yes\n"
    assert dest.read_text() == "a\nb\n" and dest.stat().st_mode & 0o777 == 0o600
    assert bash(run).stdout == f"ok: {dest} already up to date\nflag=no\n"
    quiet = bash(f'install_if_changed -q - "{dest}" 0600 <<<"c"; echo "flag=$FILE_CHANGED"')
    assert quiet.stdout == "flag=yes\n" and dest.read_text() == "c\n"


def test_a_missing_source_fails_the_step(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    proc = bash(f'install_if_changed "{tmp_path}/absent" "{dest}" 0644; echo "still running"')
    assert proc.returncode != 0
    assert f"source file {tmp_path}/absent is missing" in proc.stderr
    assert "changed:" not in proc.stdout and "still running" not in proc.stdout
    assert not dest.exists()


def test_an_unwritable_target_fails_the_step(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_text("x\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = bash(f'install_if_changed "{src}" "{blocker}/dest" 0644; echo "still running"')
    assert proc.returncode != 0 and "still running" not in proc.stdout
    assert f"cannot create the directory of {blocker}/dest" in proc.stderr
    assert "changed:" not in proc.stdout


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_a_read_only_target_fails_the_step(tmp_path: Path) -> None:
    """Root writes through permissions: a read-only mount (private namespace) is what stops it."""
    target_dir = tmp_path / "ro"
    target_dir.mkdir()
    (target_dir / "dest").write_text("old\n")
    src = tmp_path / "src"
    src.write_text("new\n")
    inner = (f'mount --bind "{target_dir}" "{target_dir}" && mount -o remount,bind,ro "{target_dir}" && '
             f'set -euo pipefail; . "{COMMON}"; '
             f'install_if_changed "{src}" "{target_dir}/dest" 0644; echo "still running"')
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", inner],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 and "mount" in proc.stderr and "install_if_changed" not in proc.stderr \
            and "beside" not in proc.stderr:
        pytest.skip(f"no private mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode != 0 and "still running" not in proc.stdout
    assert f"cannot copy {src} to beside {target_dir}/dest" in proc.stderr
    assert (target_dir / "dest").read_text() == "old\n"


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    proc = bash(f'install_if_changed "{tmp_path}/x" "{tmp_path}/y" rw-r--r--; echo "still running"')
    assert proc.returncode != 0 and "must be octal like 0644, got 'rw-r--r--'" in proc.stderr
    proc = bash(f'install_if_changed "{tmp_path}/x"')
    assert proc.returncode != 0 and "expected [-q] SRC DEST MODE" in proc.stderr


def test_die_ends_the_script_with_the_message() -> None:
    proc = bash('die "no k3s here"; echo "still running"')
    assert proc.returncode == 1 and proc.stderr == "error: no k3s here\n" and proc.stdout == ""


def test_one_helper_one_die_one_kubectl_wrapper() -> None:
    """No script under provision/ defines its own write-if-changed helper, die or kc again."""
    definitions: dict[str, list[str]] = {}
    pattern = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(\)\s*\{", re.M)
    for path in sorted((ROOT / "provision").rglob("*")):
        if not path.is_file() or path.suffix in (".service", ".timer", ".conf"):
            continue
        for name in pattern.findall(path.read_text(errors="replace")):
            definitions.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert definitions["install_if_changed"] == ["provision/files/common/lib.sh"]
    assert definitions["die"] == ["provision/files/common/lib.sh"]
    for gone in ("write_if_changed", "write_file", "gate_write", "kc"):
        assert gone not in definitions, definitions.get(gone)
    assert [line for line in COMMON.read_text().splitlines() if line.startswith("KC=")] == \
        ["KC=(/usr/local/bin/k3s kubectl)"]
