"""verify_ova, structural part: a sound OVA passes; each kind of damage is refused with its reason.

Every damaged OVA is a copy of the session's real OVA, altered the way things go wrong in
practice: a flipped byte, a missing member, members out of order, a truncated download, a PAX
header, a manifest that lies, a disk that is not streamOptimized.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.errors import UsageError, VerifyError
from appliance.export.ova import manifest_text, ustar_header, write_ova
from appliance.run import run
from appliance.verify import verify_ova
from appliance.verify_ova import parse_manifest

OVF, MF, VMDK = "csghub-test.ovf", "csghub-test.mf", "csghub-test-disk001.vmdk"


def members_of(ova: Path) -> dict[str, bytes]:
    with tarfile.open(ova) as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


def pack(dest: Path, members: list[tuple[str, bytes]]) -> Path:
    with dest.open("wb") as f:
        for name, data in members:
            f.write(ustar_header(name, len(data)))
            f.write(data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    return dest


def remanifest(members: dict[str, bytes], *names: str) -> bytes:
    return manifest_text([(n, hashlib.sha1(members[n]).hexdigest()) for n in names], "SHA1")


def reasons_for(path: Path, schema_dir: Path) -> list[str]:
    with pytest.raises(VerifyError) as err:
        verify_ova(path, boot=False, schema_dir=schema_dir)
    assert str(path) in err.value.message
    return err.value.reasons


def offset_of(ova: Path, needle: bytes) -> int:
    data = ova.read_bytes()
    at = data.find(needle)
    assert at > 0
    return at


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def copy(built_ova: Path, tmp_path: Path) -> Path:
    target = tmp_path / built_ova.name
    shutil.copyfile(built_ova, target)
    return target


def test_a_sound_ova_passes_every_check(built_ova: Path, ovf_schema_dir: Path) -> None:
    report = verify_ova(built_ova, boot=False, schema_dir=ovf_schema_dir)
    assert report.members == [OVF, MF, VMDK]
    assert report.ovf_format == "ovf10"
    assert report.disks == {VMDK: 64 * 2**20}
    assert dict(report.checks) == {
        "tar format": "checked", "member order": "checked", "OVF schema": "checked",
        "manifest digests": "checked", "disk format and size": "checked",
    }
    assert report.boot is None


def test_an_ovf20_ova_passes(tmp_path: Path, small_disk: Path, make_cfg: Callable[..., ApplianceConfig],
                             ovf_schema_dir: Path) -> None:
    result = write_ova(small_disk, make_cfg("output.formats={virtualbox-ova-ovf20}"), tmp_path / "two.ova")
    assert verify_ova(result.path, boot=False, schema_dir=ovf_schema_dir).ovf_format == "ovf20"


def test_one_flipped_byte_in_the_disk_is_refused(copy: Path, ovf_schema_dir: Path) -> None:
    with tarfile.open(copy) as tar:
        disk = tar.getmember(VMDK)
    flip_byte(copy, disk.offset_data + disk.size // 2)
    reasons = reasons_for(copy, ovf_schema_dir)
    assert f"{VMDK}: SHA1 digest differs from the manifest (damaged or altered)" in reasons


def test_one_flipped_byte_in_the_descriptor_is_refused(copy: Path, ovf_schema_dir: Path) -> None:
    flip_byte(copy, offset_of(copy, b"Meta-information"))
    reasons = reasons_for(copy, ovf_schema_dir)
    assert f"{OVF}: SHA1 digest differs from the manifest (damaged or altered)" in reasons


def test_one_flipped_byte_in_a_header_is_refused(copy: Path, ovf_schema_dir: Path) -> None:
    with tarfile.open(copy) as tar:
        disk = tar.getmember(VMDK)
    flip_byte(copy, disk.offset + 10)  # inside the member's name field
    reasons = reasons_for(copy, ovf_schema_dir)
    assert any("checksum mismatch" in r for r in reasons)
    assert any(f"{VMDK!r} is listed in References but missing" in r for r in reasons)


def test_missing_member_is_refused(copy: Path, ovf_schema_dir: Path) -> None:
    m = members_of(copy)
    pack(copy, [(OVF, m[OVF]), (MF, m[MF])])
    reasons = reasons_for(copy, ovf_schema_dir)
    assert f"{VMDK!r} is listed in References but missing from the archive" in reasons
    assert f"manifest lists {VMDK!r}, which is not in the archive" in reasons


def test_wrong_order_is_refused(copy: Path, ovf_schema_dir: Path) -> None:
    m = members_of(copy)
    pack(copy, [(MF, m[MF]), (OVF, m[OVF]), (VMDK, m[VMDK])])
    reasons = reasons_for(copy, ovf_schema_dir)
    assert f"first member is {MF!r}; an OVA must start with its .ovf descriptor" in reasons
    assert any(r.startswith("members are out of order") for r in reasons)
    pack(copy, [(VMDK, m[VMDK]), (OVF, m[OVF]), (MF, m[MF])])
    reasons = reasons_for(copy, ovf_schema_dir)
    assert any(r.startswith("members are out of order") for r in reasons)
    # The manifest last is how VirtualBox writes it: accepted.
    pack(copy, [(OVF, m[OVF]), (VMDK, m[VMDK]), (MF, m[MF])])
    assert verify_ova(copy, boot=False, schema_dir=ovf_schema_dir).members == [OVF, VMDK, MF]


def test_truncated_download_is_refused(copy: Path, ovf_schema_dir: Path) -> None:
    with copy.open("r+b") as f:
        f.truncate(copy.stat().st_size - 4096)
    reasons = reasons_for(copy, ovf_schema_dir)
    assert any("run past the archive's end (truncated)" in r for r in reasons)


def test_pax_headers_are_refused_because_virtualbox_cannot_read_them(
    copy: Path, tmp_path: Path, ovf_schema_dir: Path
) -> None:
    m = members_of(copy)
    src = tmp_path / "src"
    src.mkdir()
    for name, data in m.items():
        (src / name).write_bytes(data)
    with tarfile.open(copy, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in (OVF, MF, VMDK):
            info = tar.gettarinfo(str(src / name), arcname=name)
            info.pax_headers = {"comment": "written by a PAX tar"}
            with (src / name).open("rb") as f:
                tar.addfile(info, f)
    reasons = reasons_for(copy, ovf_schema_dir)
    assert any("PAX extended header, which VirtualBox cannot import" in r for r in reasons)


def test_unlisted_extra_member_and_unlisted_digest_are_refused(copy: Path, ovf_schema_dir: Path) -> None:
    m = members_of(copy)
    pack(copy, [(OVF, m[OVF]), (MF, m[MF]), (VMDK, m[VMDK]), ("notes.txt", b"hello\n")])
    reasons = reasons_for(copy, ovf_schema_dir)
    assert "tar member 'notes.txt' is not listed in the descriptor's References" in reasons
    assert "tar member 'notes.txt' has no digest in the manifest" in reasons


def test_malformed_manifest_is_refused(copy: Path, ovf_schema_dir: Path) -> None:
    m = members_of(copy)
    bad_mf = m[MF].replace(b"SHA1(", b"SHA-1(", 1)  # ("SHA1 (" is VirtualBox's spelling: valid)
    pack(copy, [(OVF, m[OVF]), (MF, bad_mf), (VMDK, m[VMDK])])
    reasons = reasons_for(copy, ovf_schema_dir)
    assert any(r.startswith("manifest line 1 is not 'SHA256(name)= hex'") for r in reasons)
    assert f"tar member {OVF!r} has no digest in the manifest" in reasons


def test_disk_that_is_not_stream_optimized_and_wrong_capacity_are_refused(
    copy: Path, tmp_path: Path, small_disk: Path, ovf_schema_dir: Path
) -> None:
    m = members_of(copy)
    original = dict(m)
    sparse = tmp_path / "sparse.vmdk"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", str(small_disk), str(sparse)])
    m[VMDK] = sparse.read_bytes()
    m[OVF] = m[OVF].replace(f'ovf:capacity="{64 * 2**20}"'.encode(), f'ovf:capacity="{65 * 2**20}"'.encode())
    m[OVF] = re.sub(rb'ovf:size="\d+"', f'ovf:size="{len(m[VMDK])}"'.encode(), m[OVF])
    m[MF] = remanifest(m, OVF, VMDK)
    pack(copy, [(OVF, m[OVF]), (MF, m[MF]), (VMDK, m[VMDK])])
    reasons = reasons_for(copy, ovf_schema_dir)
    # Our own walk refuses it before qemu-img opens it: a monolithicSparse VMDK is version 1.
    assert f"{VMDK}: header: version 1; a streamOptimized VMDK is version 3" in reasons

    m = original
    m[OVF] = m[OVF].replace(f'ovf:capacity="{64 * 2**20}"'.encode(), f'ovf:capacity="{65 * 2**20}"'.encode())
    m[MF] = remanifest(m, OVF, VMDK)
    pack(copy, [(OVF, m[OVF]), (MF, m[MF]), (VMDK, m[VMDK])])
    reasons = reasons_for(copy, ovf_schema_dir)
    assert f"{VMDK}: VMDK capacity {64 * 2**20} differs from the descriptor's capacity {65 * 2**20}" in reasons


def test_every_problem_is_reported_at_once(copy: Path, ovf_schema_dir: Path) -> None:
    m = members_of(copy)
    broken_ovf = m[OVF].replace(b"<System>", b"<Sys>").replace(b"</System>", b"</Sys>")
    pack(copy, [(OVF, broken_ovf), (MF, m[MF]), (VMDK, m[VMDK][:-1] + b"\x01"), ("extra", b"")])
    reasons = reasons_for(copy, ovf_schema_dir)
    assert any("breaks the OVF schema" in r for r in reasons)
    assert f"{OVF}: SHA1 digest differs from the manifest (damaged or altered)" in reasons
    assert f"{VMDK}: SHA1 digest differs from the manifest (damaged or altered)" in reasons
    assert "tar member 'extra' is not listed in the descriptor's References" in reasons


def test_boot_needs_a_login_and_a_missing_file_is_a_usage_error(built_ova: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs a login"):
        verify_ova(built_ova, boot=True)
    with pytest.raises(UsageError, match="no OVA at"):
        verify_ova(tmp_path / "nope.ova", boot=False)


def test_parse_manifest_accepts_what_virtualbox_and_ovftool_write() -> None:
    reasons: list[str] = []
    text = f"SHA1(a.ovf)= {'a' * 40}\nSHA256(b.vmdk)= {'B' * 64}\n\nSHA1 (c.vmdk) = {'c' * 40}\r\n"
    assert parse_manifest(text, reasons) == {"a.ovf": ("SHA1", "a" * 40), "b.vmdk": ("SHA256", "b" * 64),
                                             "c.vmdk": ("SHA1", "c" * 40)}
    assert reasons == []
    parse_manifest(f"SHA256(c)= {'0' * 10}\n", reasons)
    assert reasons == ["manifest line 1: SHA256 digest of 'c' has the wrong length"]


def test_http_wait_sees_a_loopback_server_and_gives_up_on_a_closed_port() -> None:
    import http.server
    import threading
    import time

    from appliance.verify_boot import free_loopback_port as _free_loopback_port
    from appliance.verify_boot import wait_http as _wait_http

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302 if self.path == "/login" else 200)
            self.send_header("Location", "/")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert _wait_http(f"http://127.0.0.1:{port}/", time.monotonic() + 10) == 200
    finally:
        server.shutdown()
        server.server_close()
    closed = _free_loopback_port()
    with pytest.raises(VerifyError, match="no successful HTTP answer"):
        _wait_http(f"http://127.0.0.1:{closed}/", time.monotonic() + 1)


def test_verify_from_config_boot_needs_an_existing_key(
    built_ova: Path, make_cfg: Callable[..., ApplianceConfig], tmp_path: Path, ovf_schema_dir: Path
) -> None:
    from appliance.verify import verify_from_config

    cached = f"artifacts.cache_dir={ovf_schema_dir.parents[1]}"  # the session's cache holding the schemas
    report = verify_from_config(make_cfg(cached), built_ova, boot=False)
    assert report.boot is None and ("OVF schema", "checked") in report.checks
    with pytest.raises(UsageError, match="does not exist"):
        verify_from_config(make_cfg(cached), built_ova, boot=True, ssh_key=str(tmp_path / "no-key"))


def test_boot_access_from_the_configuration(make_cfg: Callable[..., ApplianceConfig], tmp_path: Path) -> None:
    from appliance.verify import ConsoleLogin, SSHLogin, boot_access

    login, http_port = boot_access(make_cfg())
    assert isinstance(login, ConsoleLogin), "a sealed image is entered with its own first-boot password"
    assert http_port is None  # the stack is skipped in this config: nothing serves HTTP
    login, _ = boot_access(make_cfg("provision.skip={k3s,csghub,seal}"))
    assert isinstance(login, SSHLogin)
    assert login.user == "vagrant" and login.key_file.name == "vagrant_ed25519"
    key = tmp_path / "id"
    key.write_text("k")
    login, http_port = boot_access(make_cfg("ssh.user=admin"), ssh_key=str(key), http=True)
    assert isinstance(login, SSHLogin)
    assert (login.user, login.key_file, http_port) == ("admin", key, 30080)


def test_console_credentials_take_the_last_login_line_and_every_host_key() -> None:
    from appliance.verify_boot import ConsoleCredentials, console_credentials

    assert console_credentials("booting...\nlogin: ") is None
    text = (
        "CSGHUB-APPLIANCE-LOGIN user=csghub password=old-one\r\n"
        "noise CSGHUB-APPLIANCE-LOGIN user=evil password=x\n"  # not at a line start: ignored
        "CSGHUB-APPLIANCE-HOSTKEY ED25519 SHA256:abc\n"
        "CSGHUB-APPLIANCE-HOSTKEY ECDSA SHA256:def\n"
        "CSGHUB-APPLIANCE-LOGIN user=csghub password=k7m2q-xw9ta firstboot=0123abcd\n"
    )
    assert console_credentials(text) == ConsoleCredentials("csghub", "k7m2q-xw9ta",
                                                           frozenset({"SHA256:abc", "SHA256:def"}), "0123abcd")
    # An image from before the first-boot proof prints no nonce: nothing to match this boot's.
    old = console_credentials("CSGHUB-APPLIANCE-LOGIN user=csghub password=pw\n")
    assert old is not None and old.first_boot_nonce is None


def test_host_key_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    import subprocess

    import paramiko

    from appliance.verify_boot import host_key_fingerprint

    key = tmp_path / "hk"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    listed = subprocess.run(["ssh-keygen", "-lf", str(key) + ".pub"], check=True, capture_output=True, text=True,
                            timeout=30).stdout.split()[1]
    assert host_key_fingerprint(paramiko.Ed25519Key.from_private_key_file(str(key))) == listed


def test_http_check_sends_the_appliance_host_and_wants_success() -> None:
    """A gateway that routes by host name answers 404 to anything else: the check must send the name."""
    import http.server
    import threading
    import time

    from appliance.errors import VerifyError
    from appliance.verify_boot import wait_http as _wait_http

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.headers.get("Host") == "csghub.localhost:30080" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert _wait_http(url, time.monotonic() + 10, "csghub.localhost:30080") == 200
        with pytest.raises(VerifyError, match="no successful HTTP answer") as info:
            _wait_http(url, time.monotonic() + 2, "other.example:30080")
        assert "HTTP 404" in str(info.value)
    finally:
        server.shutdown()
        server.server_close()


def test_a_login_line_without_this_boots_nonce_is_refused_as_an_earlier_first_boot(tmp_path: Path) -> None:
    """An image whose first boot ran before (e.g. in the build VM) prints another nonce, or none."""
    import time

    from appliance.verify_boot import _console_login_check, free_loopback_port

    console = tmp_path / "console.log"
    now = time.monotonic()
    for line, seen in [("CSGHUB-APPLIANCE-LOGIN user=csghub password=pw firstboot=none", "none"),
                       ("CSGHUB-APPLIANCE-LOGIN user=csghub password=pw firstboot=" + "a" * 32, "a" * 32),
                       ("CSGHUB-APPLIANCE-LOGIN user=csghub password=pw", "none")]:
        console.write_text("booting\n" + line + "\n")
        with pytest.raises(VerifyError, match="first boot already ran before this boot") as err:
            _console_login_check(free_loopback_port(), console, "true", now + 5, now, "b" * 32)
        assert f"first-boot nonce {seen!r}, not this boot's {'b' * 32!r}" in err.value.reasons[0]


def test_the_images_status_line_says_whether_the_stack_is_there() -> None:
    from appliance.verify_boot import console_stack

    assert console_stack("nothing yet") is None
    text = ("CSGHUB-APPLIANCE-STATUS stack=installed mode=nat url=http://x status=starting\n"
            "CSGHUB-APPLIANCE-STATUS stack=absent mode=nat url=http://x status=CSGHub stack not installed\n")
    assert console_stack(text) == "absent"


def test_http_is_skipped_only_when_the_image_says_it_has_no_stack() -> None:
    from appliance.verify_boot import http_skip_reason

    assert http_skip_reason(True, "absent") == "the image's status line says stack=absent"
    assert http_skip_reason(True, "installed") == ""
    assert http_skip_reason(True, None) == ""  # no status line: check as configured
    assert http_skip_reason(False, "absent") == ""  # --http, or a build that includes the stack: always check


def test_a_guest_not_ready_for_ssh_gives_no_paramiko_traceback() -> None:
    """A port that accepts and closes at once is what a booting guest's forward looks like.

    Run in a child process: pytest's own log capture would hide what a user's terminal shows.
    """
    import subprocess
    import sys

    from appliance.config import PROJECT_ROOT

    child = """
import socket, threading, paramiko
from appliance.verify_boot import _PasswordShell
server = socket.create_server(("127.0.0.1", 0))
def accept_and_close():
    while True:
        conn, _ = server.accept()
        conn.close()
threading.Thread(target=accept_and_close, daemon=True).start()
for _ in range(3):
    try:
        _PasswordShell(server.getsockname()[1], "u", "p", frozenset())
    except (paramiko.SSHException, EOFError, OSError) as exc:
        print("retry:", type(exc).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT)})
    assert proc.stdout.count("retry:") == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Exception (client)" not in proc.stderr, proc.stderr


def test_schema_validation_that_cannot_run_is_reported_as_such(built_ova: Path, tmp_path: Path) -> None:
    report = verify_ova(built_ova, boot=False)
    outcome = dict(report.checks)["OVF schema"]
    assert outcome.startswith("not run: no folder of DMTF OVF schemas was given; `invoke fetch`")
    assert not report.schema_checked
    assert report.as_dict()["checks"]["OVF schema"] == outcome  # type: ignore[index]
    # Schemas that exist but cannot be loaded: also "not run", never a traceback.
    (tmp_path / "ovf1").mkdir()
    (tmp_path / "ovf2").mkdir()
    report = verify_ova(built_ova, boot=False, schema_dir=tmp_path)
    assert dict(report.checks)["OVF schema"].startswith("not run: the schemas in")
