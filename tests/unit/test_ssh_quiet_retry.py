"""A guest whose sshd is not up yet is one quiet retry line, not Paramiko's traceback (issue 12, item 9).

A port that accepts and closes at once is what a booting or rebooting guest's SSH looks like.
The verify boot's password shell was made quiet before (test_verify.py); the provisioning
session (``RemoteSession``, used for every step, reconnect and reboot wait) still printed
"Exception (client): Error reading SSH protocol banner" with two tracebacks per attempt. Run in
a child process: pytest's own log capture would hide what a user's terminal shows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from appliance.config import PROJECT_ROOT

CHILD = """
import socket, sys, threading
from pathlib import Path
from appliance.errors import RemoteError
from appliance.ssh import RemoteSession, SSHEndpoint
server = socket.create_server(("127.0.0.1", 0))
def accept_and_close():
    while True:
        conn, _ = server.accept()
        conn.close()
threading.Thread(target=accept_and_close, daemon=True).start()
endpoint = SSHEndpoint("127.0.0.1", server.getsockname()[1], "root", (Path(sys.argv[1]),))
session = RemoteSession(endpoint, known_hosts=Path(sys.argv[2]), connect_retries=3, retry_delay=(0.05, 0.1),
                        connect_timeout=5)
try:
    session.open()
except RemoteError as exc:
    print("gave up:", exc.message)
"""


def test_a_guest_not_answering_yet_is_one_retry_line_and_a_clear_error(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(key), str(tmp_path / "known_hosts")],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT)})
    output = proc.stdout + proc.stderr
    assert "gave up: cannot connect to root@127.0.0.1" in output and "after 4 attempts" in output, output
    # The port closes (EOF) or, on a loaded host, resets the connection: one line either way.
    assert output.count("not answering yet (Error reading SSH protocol banner") == 1, output
    assert "banner[Errno" not in output, output
    assert "Traceback" not in output and "Exception (client)" not in output, output
