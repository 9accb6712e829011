#!/usr/bin/python3 -IS
"""The forced command of a key the gitlab-sshd stand-in let in (tests/csghub_stand_in.py, GitlabSshd).

Usage: gitlab_shell_command.py CONFIG key-ID, with SSH_ORIGINAL_COMMAND ``git-upload-pack '<type>s/<ns>/<name>.git'``
(the clone path csghub-server v2.4.0-ce api/handler/internal.go ``getRepoInfoFronClonePath`` reads). Runs a real
``git upload-pack`` on that bare repository (where Gitaly would serve it from); anything else is refused, as
gitlab-shell refuses commands it does not know. Fetching is all the readiness gate does.
"""

import json
import os
import re
import sys


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        config = json.load(f)
    wanted = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    match = re.fullmatch(r"git-upload-pack '/?((?:model|dataset|code|space)s/[\w.-]+/[\w.-]+\.git)'", wanted)
    if match is None:
        print(f"gitlab-shell: disallowed command {wanted!r}", file=sys.stderr)
        return 1
    repository = os.path.join(config["repositories"], match.group(1))
    if not os.path.isdir(repository):
        print("remote: The project you were looking for could not be found.", file=sys.stderr)
        return 1
    os.execvp("git", ["git", "upload-pack", repository])
    return 1


if __name__ == "__main__":
    sys.exit(main())
