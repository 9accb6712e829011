"""Fixtures of the `ssh` tier: a real OpenSSH server the fixture starts on a loopback port.

See ``sshd_server.py``. When the login user is root (CI here: no sudo installed) the session
runs commands without a sudo prefix.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sshd_server import SSHServer, make_server

from appliance.ssh import RemoteSession


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.ssh)


def _server(directory: Path) -> SSHServer:
    try:
        return make_server(directory)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """One sshd shared by the tier (tests that restart or re-key it use ``private_sshd``)."""
    server = _server(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_sshd(tmp_path: Path) -> Iterator[SSHServer]:
    """An sshd of this test alone: it may be restarted, re-keyed or have its connections killed."""
    server = _server(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def session(sshd: SSHServer, tmp_path: Path) -> Iterator[RemoteSession]:
    with sshd.session(known_hosts=tmp_path / "known_hosts") as s:
        yield s
