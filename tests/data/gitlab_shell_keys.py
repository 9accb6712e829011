#!/usr/bin/python3 -IS
"""sshd's AuthorizedKeysCommand for the gitlab-sshd stand-in (tests/csghub_stand_in.py, GitlabSshd).

Usage: gitlab_shell_keys.py CONFIG KEY_TYPE KEY (sshd's %t %k). Asks csghub-server, as gitlab-shell does, who
owns KEY: ``GET <gitlab_url>/api/v4/internal/authorized_keys?key=KEY`` with the header
``Gitlab-Shell-Api-Request: <HS256 JWT, issuer "gitlab-shell", signed with config.yml's secret>`` (gitlab-shell
internal/gitlabnet/client.go and internal/gitlabnet/authorizedkeys; the route and its JWT check in csghub-server
v2.4.0-ce api/router/api.go and api/middleware/gitlab_shell_jwt.go). On 200 it prints the authorized_keys line
gitlab-shell's authorized-keys check prints (the key forced to run gitlab-shell with its id); otherwise nothing,
so sshd refuses the key. sshd runs it as root from a root-owned path (its safe_path rule): it lives in the tree.
Standard library only (sshd starts it with an empty environment), and a plain socket rather than urllib: sshd
runs it twice per sign-in, and the test tier pays for each interpreter start.
"""

import base64
import hashlib
import hmac
import json
import socket
import sys
import time


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main() -> int:
    config_path, key_type, key = sys.argv[1:4]
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    now = int(time.time())
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"iss": "gitlab-shell", "iat": now, "exp": now + 60}).encode())
    signature = b64url(hmac.new(config["secret"].encode(), f"{head}.{claims}".encode(), hashlib.sha256).digest())
    host, _, port = config["gitlab_url"].removeprefix("http://").partition(":")
    quoted = "".join(c if c.isalnum() or c in "-_.~" else f"%{ord(c):02X}" for c in key)
    request = (f"GET /api/v4/internal/authorized_keys?key={quoted} HTTP/1.0\r\nHost: {config['host']}\r\n"
               f"Gitlab-Shell-Api-Request: {head}.{claims}.{signature}\r\n\r\n")
    try:
        with socket.create_connection((host, int(port or 80)), timeout=10) as conn:
            conn.sendall(request.encode())
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        if status_line.split()[1:2] != [b"200"]:
            raise ValueError(status_line.decode(errors="replace"))
        found = json.loads(rest.partition(b"\r\n\r\n")[2])
    except (OSError, ValueError, IndexError) as exc:
        print(f"gitlab-shell: csghub-server refused the key lookup: {exc}", file=sys.stderr)
        return 0
    options = "no-port-forwarding,no-X11-forwarding,no-agent-forwarding,no-pty"
    print(f'command="{config["command"]} {config_path} key-{int(found["id"])}",{options} {key_type} {key}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
