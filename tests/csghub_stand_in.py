"""A stand-in for what answers behind CSGHub's gateway NodePort, for the readiness gate's probes.

One loopback HTTP server routes by Host as the chart's HTTPRoutes do (chart 2.4.0,
templates/csghub/httproutes.yaml and the casdoor route), and each backend answers as its upstream
does at the version the chart deploys. Each answer below names the upstream file it was read in:

- Envoy (the gateway's proxy; chart 2.4.0 runs distroless-v1.37.5): a Host no route names gets
  404 with an empty body (envoyproxy/envoy source/common/router/router.cc, ``decodeHeaders``: no
  route -> ``sendLocalReply(Http::Code::NotFound, "")``, read in the stored copy of Envoy's main line).
- The portal (``<domain>``, path ``/``): 200 on ``/``, 302 elsewhere. Not read in the portal's own
  source (csghub v2.4.0's Go server was not found in the stored copies): it is what issue 23 reports
  of a real copy, and the gate relies only on the 200 on ``/``.
- csghub-server v2.4.0 (``<domain>/api``): ``GET /api/v1/models`` answers 200 with its envelope
  ``{"msg": "OK", "data": [...]}`` (api/httpbase/response.go ``OKWithTotal``, api/router/api.go).
- distribution v2.8.3 (``<domain>/v2``; the chart's ``registry:2.8.3``), htpasswd auth: no
  credentials or wrong ones -> 401 with ``WWW-Authenticate: Basic realm="..."`` and the
  ``UNAUTHORIZED`` "authentication required" error; the htpasswd file's bcrypt hash is checked
  (tag v2.8.3: registry/auth/htpasswd/access.go ``Authorized``/``challenge.SetHeaders``,
  registry/api/errcode/register.go); right ones -> 200 ``{}`` with
  ``Docker-Distribution-API-Version: registry/2.0`` (registry/handlers/app.go ``apiBase``); blob uploads,
  manifests and pulls as ``StandIn.registry_call`` says, checked against the real registry (Debian's
  docker-registry, distribution 2.8) in tests/unit/test_registry_probe.py.
- csghub-server v2.4.0-ce's sign-in and the APIs the git probe uses (``<domain>/api``, and
  ``csghub-server`` as gitlab-shell reaches it): ``GET /api/v1/callback/casdoor?code=&state=casdoor``
  exchanges the code at Casdoor's token endpoint with the client secret *csghub-server* holds
  (``server_client_secret``) and answers 302 to ``<external>/server/callback?jwt=<HS256 JWT>``, or 302 to
  ``<external>/errors/server-error?error_code=500&error_message=failed to signin: ...`` (csghub-server
  user/handler/user.go ``Casdoor``, user/component/user.go ``Signin``, the proxy in api/router/api.go; the
  JWT's claims ``uuid``/``current_user``, common/types/jwt.go; the oauth2 error text is golang.org/x/oauth2's
  ``RetrieveError``). A ``Bearer`` JWT signed with ``hub_jwt_key`` authenticates (api/middleware/authenticator.go
  ``isValidJWTToken``; else 401); ``GET /api/v1/user/:username/ssh_keys``
  (``{"data": [{"id", "name", "content", ...}]}``),
  ``POST /api/v1/user/:username/ssh_keys`` ``{"name", "content"}`` and
  ``DELETE /api/v1/user/:username/ssh_key/:name`` (api/handler/sshkey.go, ``UserMatch``: the path's user must be
  the JWT's); ``POST /api/v1/models`` ``{"namespace", "name", "private"}`` makes a bare repository (400 when it exists,
  api/handler/model.go ``Create``: ``BadRequestWithExt``),
  ``DELETE /api/v1/models/:namespace/:name`` removes it (api/router/api.go); ``GET
  /api/v4/internal/authorized_keys?key=`` answers ``{"id", "key"}`` only with a ``Gitlab-Shell-Api-Request``
  JWT signed with ``gitaly_jwt_secret`` (api/middleware/gitlab_shell_jwt.go: 401 ``{"error": ...}`` otherwise;
  api/handler/internal.go ``GetAuthorizedKeys``: 500 for an unknown key).
- gitlab-sshd (``GitlabSshd``, below): a real OpenSSH sshd that lets a key in only when csghub-server's internal
  API names it, and serves ``git upload-pack``.
- Casdoor v3.62.0 (``casdoor.<domain>``): ``POST /api/login`` with ``type: "code"`` and the query
  ``clientId``, ``responseType``, ``redirectUri``, ``scope``, ``state`` (controllers/auth.go
  ``Login``/``HandleLoggedIn``, object/token_oauth_util.go ``CheckOAuthLogin``/``GetOAuthCode``);
  wrong passwords counted per user, locked after ``failedSigninLimit`` (5, as chart 2.4.0's CSGHub
  application sets) for ``failedSigninFrozenTime`` (object/check.go ``checkSigninErrorTimes``,
  object/check_util.go ``recordSigninErrorInfo``); the chart turns ``enableErrorMask`` on, so a
  wrong password or an unknown user reads "password or code is incorrect" (i18n/util.go
  ``Translate``); ``POST /api/login/oauth/access_token`` exchanges the code for an RS256 JWT signed
  with the application's certificate's key (header ``kid`` = the cert's name), or answers 401
  ``invalid_client`` for a wrong secret (object/token_oauth.go ``GetAuthorizationCodeToken``,
  controllers/util.go ``SetTokenErrorHttpStatus``, object/token_jwt.go), or 400 ``invalid_grant`` when the
  request's ``redirect_uri`` is not the code's (controllers/token.go of Casdoor's main line reads it; not
  confirmed at v3.62.0).

``GitlabSshd`` is a real OpenSSH sshd that authenticates keys as gitlab-shell does: its
AuthorizedKeysCommand (tests/data/gitlab_shell_keys.py) asks csghub-server's internal API with a JWT signed
by the secret gitlab-shell holds, and the key's forced command (tests/data/gitlab_shell_command.py) runs a
real ``git upload-pack`` on the bare repository csghub-server made.

The lockout here lasts ``frozen_seconds`` (upstream: minutes) so a test can wait it out; the
message still counts minutes, rounded up, as upstream prints them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import bcrypt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

REGISTRY_REALM = "Registry Realm"


def new_signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def certificate_pem(key: rsa.RSAPrivateKey, name: str = "csghub-cert") -> str:
    """A self-signed certificate for ``key`` (what csghub-server reads from Secret csghub-casdoor-certs)."""
    import datetime

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "admin"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def htpasswd_line(user: str, password: str) -> str:
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_jwt(key: bytes, claims: dict[str, Any]) -> str:
    """An HS256 JWT (what golang-jwt makes for csghub-server's login tokens and gitlab-shell's API requests)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{_b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64url(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


def hs256_claims(key: bytes, token: str) -> dict[str, Any] | None:
    """The claims of ``token`` when it is an HS256 JWT signed with ``key`` and not expired, else None."""
    try:
        head, payload, signature = token.split(".")
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        given = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (ValueError, UnicodeDecodeError):
        return None
    wanted = hmac.new(key, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    if header.get("alg") != "HS256" or not hmac.compare_digest(given, wanted) or not isinstance(claims, dict):
        return None
    if "exp" in claims and float(claims["exp"]) < time.time():
        return None
    return claims


@dataclass
class StandIn:
    """What the copy's services hold (each may be set to disagree with what the cluster tells the gate)."""

    domain: str
    admin_user: str
    admin_password: str
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    signing_key: rsa.RSAPrivateKey
    htpasswd: str  # the registry's htpasswd file (one "user:bcrypt" line)
    failed_signin_limit: int = 5
    frozen_seconds: float = 15 * 60
    # csghub-server's own configuration: the Casdoor client secret it exchanges codes with (None: Casdoor's),
    # the key of the JWTs it issues at sign-in (config.JWT.SigningKey), and the key gitlab-shell's and Gitaly's
    # JWTs must be signed with (config.GitalyServer.JWTSecret, STARHUB_SERVER_GITALY_JWT_SECRET).
    server_client_secret: str | None = None
    hub_jwt_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    gitaly_jwt_secret: str = field(default_factory=lambda: secrets.token_hex(16))
    external: str = ""  # the copy's URL base (where the callback redirects)
    repos_root: Path | None = None  # where csghub-server's (Gitaly's) repositories live, bare
    ssh_keys: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # id -> (user, name, content)
    key_deletes_fail: bool = False  # DELETE .../ssh_key/:name answers 500 (its database call failing, say)
    repo_creates_fail: bool = False  # POST /api/v1/models answers 500 (Gitaly not answering, say)
    # Casdoor's per-user state and issued codes.
    wrong_times: int = 0
    last_wrong: float = 0.0
    codes: dict[str, str] = field(default_factory=dict)
    code_redirects: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, host, path)
    # The registry's storage.
    uploads: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)

    # -- Casdoor ------------------------------------------------------------------------------

    def casdoor_login(self, query: dict[str, str], form: dict[str, Any]) -> dict[str, Any]:
        def error(msg: str) -> dict[str, Any]:
            return {"status": "error", "msg": msg, "data": None}

        if form.get("application") != "CSGHub":
            return error(f"The application: admin/{form.get('application')} does not exist")
        # checkSigninErrorTimes, before the password is even looked at.
        if self.wrong_times >= self.failed_signin_limit:
            left = self.frozen_seconds - (time.monotonic() - self.last_wrong)
            if left > 0:
                minutes = max(1, math.ceil(left / 60))
                return error("You have entered the wrong password or code too many times, "
                             f"please wait for {minutes} minutes and try again")
            self.wrong_times = 0
        if form.get("username") != self.admin_user or form.get("password") != self.admin_password:
            if form.get("username") == self.admin_user:
                self.wrong_times = min(self.wrong_times + 1, self.failed_signin_limit)
                if self.wrong_times >= self.failed_signin_limit:
                    self.last_wrong = time.monotonic()
            return error("password or code is incorrect")  # enableErrorMask hides the remaining chances
        self.wrong_times = 0
        if form.get("type") != "code":
            return {"status": "ok", "msg": "", "data": f"OpenCSG/{self.admin_user}"}
        response_type = query.get("responseType", "")
        if response_type not in ("code", "token", "id_token"):
            return error(f"Grant_type: {response_type} is not supported in this application")
        if query.get("clientId") != self.client_id:
            return error("Invalid client_id")
        if query.get("redirectUri", "") not in self.redirect_uris:
            return error(f"Redirect URI: {query.get('redirectUri', '')} doesn't exist in the allowed Redirect URI list")
        code = secrets.token_hex(10)
        self.codes[code] = self.admin_user
        self.code_redirects[code] = query.get("redirectUri", "")
        return {"status": "ok", "msg": "", "data": code}

    def casdoor_token(self, form: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        code = form.get("code", "")
        user = self.codes.pop(code, None)
        if user is None:
            return 400, {"error": "invalid_grant", "error_description": f"authorization code: [{code}] is invalid"}
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return 401, {"error": "invalid_client", "error_description":
                         "client_secret is invalid for application: [admin/CSGHub], token.CodeChallenge: empty"}
        # Casdoor's main line (controllers/token.go reads redirect_uri) checks it against the code's when the request
        # carries one, as RFC 6749 4.1.3 asks; v3.62.0 reads no redirect_uri there (controllers/token.go,
        # object/token_oauth.go at that tag), and csghub-server's SDK exchange sends none.
        expected = self.code_redirects.pop(code, "")
        if form.get("redirect_uri") and form["redirect_uri"] != expected:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri does not match"}
        header = {"alg": "RS256", "kid": "csghub-cert", "typ": "JWT"}
        now = int(time.time())
        claims = {"owner": "OpenCSG", "name": user, "iss": f"http://casdoor.{self.domain}", "sub": user,
                  "aud": [self.client_id], "iat": now, "exp": now + 3600, "tokenType": "access-token"}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.signing_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing_input}.{_b64url(signature)}"
        return 200, {"access_token": token, "id_token": token, "refresh_token": token, "token_type": "Bearer",
                     "expires_in": 3600, "scope": "read"}

    # -- csghub-server ---------------------------------------------------------------------------

    def callback(self, query: dict[str, str]) -> str:
        """Where ``GET /api/v1/callback/casdoor`` redirects (302): the portal with a JWT, or the error page."""
        secret = self.client_secret if self.server_client_secret is None else self.server_client_secret
        code, answer = self.casdoor_token({"grant_type": "authorization_code", "client_id": self.client_id,
                                           "client_secret": secret, "code": query.get("code", "")})
        if code != 200:
            message = (f"failed to signin: failed to get token from casdoor,error:oauth2: "
                       f"\"{answer['error']}\" \"{answer['error_description']}\"")
            return f"{self.external}/errors/server-error?error_code=500&error_message={quote(message, safe='')}"
        now = int(time.time())
        token = hs256_jwt(self.hub_jwt_key, {"uuid": f"uuid-{self.admin_user}", "current_user": self.admin_user,
                                             "exp": now + 3600, "iat": now})
        return f"{self.external}/server/callback?jwt={token}"

    def current_user(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        claims = hs256_claims(self.hub_jwt_key, authorization[len("Bearer "):])
        return None if claims is None else str(claims.get("current_user", "")) or None

    def server_call(self, method: str, path: str, user: str | None, body: bytes) -> tuple[int, dict[str, Any]]:
        """An authenticated user's call to csghub-server's API (the routes the git probe uses)."""
        if user is None:
            return 401, {"msg": "invalid authorization header"}
        parts = path.strip("/").split("/")  # api v1 ...
        form = json.loads(body or b"{}")
        if parts[2:3] == ["user"] and len(parts) >= 5:
            if parts[3] != user:  # UserMatch
                return 401, {"msg": "user not match"}
            if method == "GET" and parts[4] == "ssh_keys" and len(parts) == 5:
                # api/handler/sshkey.go Index: httpbase.OK with the user's database.SSHKey rows
                # (builder/store/database/ssh_key.go: "id", "git_id", "name", "content", "user_id", ...).
                return 200, {"msg": "OK", "data": [
                    {"id": key_id, "git_id": key_id, "name": name, "content": content, "user_id": 1}
                    for key_id, (owner, name, content) in sorted(self.ssh_keys.items()) if owner == user]}
            if method == "POST" and parts[4] == "ssh_keys":
                key_id = max(self.ssh_keys, default=0) + 1
                self.ssh_keys[key_id] = (user, str(form.get("name", "")), str(form.get("content", "")).strip())
                return 200, {"msg": "OK", "data": {"id": key_id, "name": form.get("name")}}
            if method == "DELETE" and parts[4] == "ssh_key" and len(parts) == 6:
                if self.key_deletes_fail:
                    return 500, {"msg": "failed to delete ssh key"}
                for key_id, (owner, name, _) in list(self.ssh_keys.items()):
                    if owner == user and name == parts[5]:
                        del self.ssh_keys[key_id]
                return 200, {"msg": "OK", "data": None}
        if parts[2:3] == ["models"] and self.repos_root is not None:
            if method == "POST" and len(parts) == 3:
                if self.repo_creates_fail:
                    return 500, {"msg": "failed to create repository"}
                repo = self.repos_root / "models" / str(form.get("namespace")) / f"{form.get('name')}.git"
                if repo.exists():
                    return 400, {"msg": "repository already exists"}
                repo.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo)], check=True)
                return 200, {"msg": "OK", "data": {"path": f"{form.get('namespace')}/{form.get('name')}"}}
            if method == "DELETE" and len(parts) == 5:
                shutil.rmtree(self.repos_root / "models" / parts[3] / f"{parts[4]}.git", ignore_errors=True)
                return 200, {"msg": "OK", "data": None}
        return 404, {"msg": "404 page not found"}

    def authorized_key(self, api_request: str | None, key: str) -> tuple[int, dict[str, Any]]:
        """``GET /api/v4/internal/authorized_keys?key=`` as gitlab-shell asks it."""
        if not api_request or hs256_claims(self.gitaly_jwt_secret.encode(), api_request) is None:
            return 401, {"error": "invilid JWT token,token signature is invalid: signature is invalid"}
        for key_id, (_, _, content) in self.ssh_keys.items():
            if content.split()[1:2] == [key]:
                return 200, {"id": key_id, "key": content}
        return 500, {"msg": "ssh key not found"}

    # -- distribution -------------------------------------------------------------------------

    def registry_authorized(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        for line in self.htpasswd.splitlines():
            name, _, hashed = line.partition(":")
            if name == user:
                return bcrypt.checkpw(password.encode(), hashed.encode())
        return False


    def registry_call(self, method: str, path: str, query: dict[str, str], body: bytes,
                      base: str) -> tuple[int, bytes, dict[str, str]]:
        """An authorized request under /v2/, as distribution v2.8.3 answers it (registry/handlers/app.go
        ``apiBase``; blobupload.go ``StartBlobUpload`` 202 with an absolute Location, ``PutBlobUploadComplete``
        201 or DIGEST_INVALID; manifests.go ``PutManifest`` 201 or MANIFEST_BLOB_UNKNOWN, ``GetManifest``;
        blob.go ``GetBlob``). Checked against the real registry in tests/unit/test_registry_probe.py."""
        import hashlib
        import uuid

        def error(code: int, name: str, message: str) -> tuple[int, bytes, dict[str, str]]:
            return code, json.dumps({"errors": [{"code": name, "message": message, "detail": None}]}).encode(), \
                {"Content-Type": "application/json"}

        if path == "/v2/":
            return 200, b"{}", {"Content-Type": "application/json"}
        name, _, rest = path[len("/v2/"):].partition("/blobs/")
        if rest == "uploads/" and method == "POST":
            upload = uuid.uuid4().hex
            self.uploads[upload] = b""
            return 202, b"", {"Location": f"{base}/v2/{name}/blobs/uploads/{upload}?_state=opaque",
                              "Docker-Upload-UUID": upload, "Range": "0-0"}
        if rest.startswith("uploads/") and method == "PUT":
            upload = rest[len("uploads/"):]
            if upload not in self.uploads:
                return error(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry")
            data = self.uploads.pop(upload) + body
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if query.get("digest") != digest:
                return error(400, "DIGEST_INVALID", "provided digest did not match uploaded content")
            self.blobs[digest] = data
            return 201, b"", {"Location": f"{base}/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest}
        if rest and method == "GET":
            if rest not in self.blobs:
                return error(404, "BLOB_UNKNOWN", "blob unknown to registry")
            return 200, self.blobs[rest], {"Content-Type": "application/octet-stream", "Docker-Content-Digest": rest}
        name, _, reference = path[len("/v2/"):].partition("/manifests/")
        if reference and method == "PUT":
            manifest = json.loads(body)
            wanted = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
            if any(digest not in self.blobs for digest in wanted):
                return error(400, "MANIFEST_BLOB_UNKNOWN", "blob unknown to registry")
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            self.manifests[f"{name}:{reference}"] = body
            return 201, b"", {"Location": f"{base}/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest}
        if reference and method == "GET":
            if f"{name}:{reference}" not in self.manifests:
                return error(404, "MANIFEST_UNKNOWN", "manifest unknown")
            body = self.manifests[f"{name}:{reference}"]
            return 200, body, {"Content-Type": json.loads(body)["mediaType"],
                               "Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()}
        return error(404, "UNSUPPORTED", "The operation is unsupported.")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, code: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self.reply(code, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _route(self, method: str) -> None:
        stand_in = self.server.stand_in
        host = self.headers.get("Host", "").rsplit(":", 1)[0]
        url = urlsplit(self.path)
        stand_in.requests.append((method, host, url.path))
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if host == stand_in.domain:
            if url.path == "/v2" or url.path.startswith("/v2/"):
                if stand_in.registry_authorized(self.headers.get("Authorization")):
                    length = int(self.headers.get("Content-Length") or 0)
                    code, body, headers = stand_in.registry_call(
                        method, url.path, query, self.rfile.read(length) if length else b"",
                        f"http://{self.headers.get('Host', '')}")
                    self.reply(code, body, {"Docker-Distribution-API-Version": "registry/2.0", **headers})
                else:
                    self.reply_json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required",
                                                      "detail": None}]},
                                    {"WWW-Authenticate": f'Basic realm="{REGISTRY_REALM}"',
                                     "Docker-Distribution-API-Version": "registry/2.0"})
            elif url.path.startswith("/api/v4/internal/"):
                self.internal(url.path, query)
            elif url.path.startswith("/api/"):
                if method == "GET" and url.path == "/api/v1/models":
                    self.reply_json(200, {"msg": "OK", "data": []})
                elif method == "GET" and url.path == "/api/v1/callback/casdoor":
                    self.reply(302, headers={"Location": stand_in.callback(query)})
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    code, answer = stand_in.server_call(method, url.path,
                                                        stand_in.current_user(self.headers.get("Authorization")),
                                                        self.rfile.read(length) if length else b"")
                    self.reply_json(code, answer)
            elif url.path == "/":
                self.reply(200, b"<!doctype html><title>CSGHub</title>", {"Content-Type": "text/html"})
            else:
                self.reply(302, headers={"Location": "/login"})
        elif host == f"casdoor.{stand_in.domain}":
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if method == "POST" and url.path == "/api/login":
                self.reply_json(200, stand_in.casdoor_login(query, json.loads(raw or b"{}")))
            elif method == "POST" and url.path == "/api/login/oauth/access_token":
                form = dict(query)
                if raw:
                    form.update(json.loads(raw))
                code, answer = stand_in.casdoor_token(form)
                headers = {"WWW-Authenticate": 'Basic realm="OAuth2"'} if code == 401 else {}
                self.reply_json(code, answer, headers)
            else:
                self.reply(200, b"<!doctype html><title>Casdoor</title>", {"Content-Type": "text/html"})
        elif host == "csghub-server":  # the Service gitlab-shell calls (chart: gitlab_url), not the gateway
            if url.path.startswith("/api/v4/internal/"):
                self.internal(url.path, query)
            else:
                self.reply_json(404, {"msg": "404 page not found"})
        else:
            self.reply(404)

    def internal(self, path: str, query: dict[str, str]) -> None:
        if path == "/api/v4/internal/authorized_keys":
            self.reply_json(*self.server.stand_in.authorized_key(self.headers.get("Gitlab-Shell-Api-Request"),
                                                                 query.get("key", "")))
        else:
            self.reply_json(404, {"msg": "404 page not found"})

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")


class _Server(ThreadingHTTPServer):
    stand_in: StandIn


class Gateway:
    """The stand-in served on a loopback port (``port``); ``stop()`` ends it."""

    def __init__(self, stand_in: StandIn) -> None:
        self.stand_in = stand_in
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.stand_in = stand_in
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


GITLAB_SHELL_KEYS = Path(__file__).resolve().parent / "data" / "gitlab_shell_keys.py"
GITLAB_SHELL_COMMAND = Path(__file__).resolve().parent / "data" / "gitlab_shell_command.py"


class GitlabSshd:
    """gitlab-sshd behind the git SSH NodePort, as a real OpenSSH sshd on a free loopback port.

    gitlab-shell (chart 2.4.0 templates/gitlab-shell/configmap.yaml: ``gitlab_url`` is csghub-server's Service,
    ``secret`` the internal API's JWT key, which secrets.sh makes per copy) finds the user of a key by asking
    csghub-server ``GET /api/v4/internal/authorized_keys?key=`` with a ``Gitlab-Shell-Api-Request`` JWT (gitlab-shell
    internal/gitlabnet/client.go, HS256, issuer "gitlab-shell"; read in the stored copy of gitlab-shell's main line,
    not at CSGHub's fork's version). Here sshd's AuthorizedKeysCommand does the same (``secret`` is what this
    gitlab-shell holds), and the key's forced command runs ``git upload-pack`` on csghub-server's bare repository.
    The login user is the current one (root here; gitlab-sshd's is ``git``: the gate's GATE_GIT_SSH_USER)."""

    def __init__(self, directory: Path, stand_in: StandIn, gateway_port: int, secret: str) -> None:
        import os
        import pwd

        from tests.ssh.sshd_server import SSHServer, _free_port, _keygen

        directory.mkdir(parents=True, exist_ok=True)
        repos = directory / "repositories"
        repos.mkdir(exist_ok=True)
        stand_in.repos_root = repos
        self.config = directory / "gitlab-shell.json"
        self.write_config(gateway_port, secret, repos)
        _keygen(directory / "host_ed25519", "ed25519")
        config = self.config

        class _Server(SSHServer):
            def write_config(self) -> None:
                self.config_file.write_text("\n".join([
                    f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
                    f"PidFile {self.directory / 'sshd.pid'}", "AuthorizedKeysFile none",
                    f"AuthorizedKeysCommand {GITLAB_SHELL_KEYS} {config} %t %k", "AuthorizedKeysCommandUser root",
                    "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "UseDNS no",
                    "LogLevel VERBOSE", "",
                ]))

        self.server = _Server(directory=directory, port=_free_port(), user=pwd.getpwuid(os.getuid()).pw_name,
                              ed25519_key=directory / "unused", rsa_key=directory / "unused",
                              host_key=directory / "host_ed25519")
        self.server.start()
        self.port = self.server.port
        self.user = self.server.user

    def write_config(self, gateway_port: int, secret: str, repos: Path) -> None:
        self.config.write_text(json.dumps({
            "gitlab_url": f"http://127.0.0.1:{gateway_port}", "host": "csghub-server:8080", "secret": secret,
            "repositories": str(repos), "command": str(GITLAB_SHELL_COMMAND)}))

    def stop(self) -> None:
        self.server.stop()


@dataclass(frozen=True)
class Copy:
    """One appliance copy's credentials as its cluster holds them: what the gate reads (Secrets and
    ConfigMaps, as the k3s stand-in serves them) and, by default, what its services hold too."""

    domain: str
    admin_user: str
    admin_password: str
    client_id: str
    client_secret: str
    registry_user: str
    registry_password: str
    signing_key: rsa.RSAPrivateKey
    certificate: str
    external: str  # the copy's own URL base (chart: common.endpoint.csghub), e.g. http://csghub.localhost:30080

    @property
    def redirect_uri(self) -> str:
        return f"{self.external}/api/v1/callback/casdoor"

    @property
    def login_url(self) -> str:
        """CSGHUB_PORTAL_LOGIN_URL as chart 2.4.0 writes it (templates/csghub/configmap.yaml)."""
        casdoor = self.external.replace("://", "://casdoor.", 1)
        return (f"{casdoor}/login/oauth/authorize?client_id={self.client_id}&response_type=code"
                f"&redirect_uri={self.redirect_uri}&scope=read&state=casdoor")

    def stand_in(self) -> StandIn:
        """Services that agree with this copy."""
        return StandIn(domain=self.domain, admin_user=self.admin_user, admin_password=self.admin_password,
                       client_id=self.client_id, client_secret=self.client_secret, redirect_uris=[self.redirect_uri],
                       signing_key=self.signing_key, htpasswd=htpasswd_line(self.registry_user, self.registry_password),
                       external=self.external)

    def cluster_state(self) -> dict[str, list[str]]:
        """The k3s stand-in's state files (tests/data/fake_k3s.py) for this copy's Secrets and ConfigMaps."""
        cert = base64.b64encode(self.certificate.encode()).decode()
        return {
            "secrets": [f"csghub-casdoor-init INIT_ADMIN_USER {self.admin_user}",
                        f"csghub-casdoor-init INIT_ADMIN_PASSWORD {self.admin_password}",
                        f"csghub-registry REGISTRY_USERNAME {self.registry_user}",
                        f"csghub-registry REGISTRY_PASSWORD {self.registry_password}",
                        f"csghub-casdoor-certs tls.crt base64:{cert}"],
            "configmaps": [f"csghub-core CSGHUB_PORTAL_LOGIN_URL {self.login_url}",
                           f"csghub-core STARHUB_SERVER_CASDOOR_CLIENT_ID {self.client_id}",
                           f"csghub-core STARHUB_SERVER_CASDOOR_CLIENT_SECRET {self.client_secret}"],
            "knativeservings": ["knative-serving/knative-serving True"],
        }


def make_copy(admin_password: str, registry_password: str, domain: str = "csghub.localhost") -> Copy:
    key = new_signing_key()
    return Copy(domain=domain, admin_user="root", admin_password=admin_password, client_id=secrets.token_hex(16),
                client_secret=secrets.token_hex(20), registry_user="registry", registry_password=registry_password,
                signing_key=key, certificate=certificate_pem(key), external=f"http://{domain}:30080")
