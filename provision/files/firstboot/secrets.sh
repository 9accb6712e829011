# shellcheck shell=bash
# Every CSGHub credential of this copy, made at its first boot (sourced by csghub-firstboot,
# after lib.sh). Installed as /usr/local/lib/csghub-appliance/secrets.sh. Sourced, never executed.
#
# Why: chart 2.4.0 derives its "random" credentials from the clock (sha256 of a service name
# and the install minute, Casdoor client ids from the install hour, the JWT and session keys
# from 8 random digits) and ships one fixed Casdoor signing key pair. Here each is made from
# /dev/urandom before k3s installs the release, and reaches the chart the way it reads it:
#
# - chart values (written into this copy's HelmChartConfig by instance_manifest, lib.sh):
#   casdoor.admin.password, server.agenticflow.token, server.xnet.apiToken, and
#   casdoor.applianceCerts.*, casdoor.applianceRadiusSecret and gitaly.applianceJwtSecret, which only the chart
#   archive patched here reads, and server.environments.STARHUB_SERVER_GITALY_JWT_SECRET (the same secret, for
#   csghub-server's check of it);
# - objects the chart `lookup`s and then reuses, labelled so that Helm adopts them: written here
#   to $PRECREATED_NAME in the secrets folder, created once in the cluster by ensure_release
#   (lib.sh, run by csghub-ready once k3s is up) and read back before the HelmChart is handed to
#   k3s. They are never in k3s's auto-deploy folder: its deploy controller re-applies that folder
#   at every start and would reset what Helm owns to these stubs.
#
# The table of every credential, its consumer and its route is in docs/first-boot.md; the unit
# tests (tests/unit/test_secrets.py) hold it against the real chart.
#
# Files (root only): $CSGHUB_SECRETS_DIR/secrets.env, casdoor-{csghub,csgship}.{crt,key},
# helm-values.yaml, $PRECREATED_NAME (the objects above). Nothing leaves the VM.

CSGHUB_SECRETS_DIR=${CSGHUB_SECRETS_DIR:-$CSGHUB_STATE/secrets}
K3S_MANIFESTS=${K3S_MANIFESTS:-/var/lib/rancher/k3s/server/manifests}
K3S_STATIC_CHARTS=${K3S_STATIC_CHARTS:-/var/lib/rancher/k3s/server/static/charts}
# Where images before this layout had the objects: taken out of the auto-deploy folder.
SECRETS_MANIFEST_NAME=csghub-appliance-secrets.yaml
# RSA-3072 is about 128-bit strength; 4096 would cost minutes of first boot under emulation.
CASDOOR_KEY_BITS=${CASDOOR_KEY_BITS:-3072}
CASDOOR_CERT_DAYS=7300 # 20 years, as the chart's own certificates
# The markers the chart patch leaves in templates/casdoor/secret.yaml and templates/gitaly/configmap.yaml.
CHART_PATCH_MARK=applianceCerts
CHART_PATCH_MARK_GITALY=applianceJwtSecret
CHART_TOP=csghub # the archive's top directory: the chart's name

# Name=how-to-make, in the order written to secrets.env. Alphabets are what every consumer
# accepts unquoted: connection URLs (postgresql://user:PW@..., nats://user:PW@...), TOML,
# YAML, environment files.
SECRET_SPECS=(
    "CSGHUB_ADMIN_PASSWORD=alnum 24"    # Casdoor admin `root` (~142 bits); typed by people
    "POSTGRES_PASSWORD=alnum 32"        # ~190 bits
    "MINIO_ROOT_PASSWORD=alnum 32"      # MinIO accepts 8-40 characters
    "NATS_PASSWORD=alnum 32"
    "REGISTRY_PASSWORD=alnum 32"
    "GITALY_TOKEN=alnum 32"
    "REDIS_PASSWORD=alnum 32"           # kept for redis.requirePass, which the build leaves off (docs/first-boot.md)
    "HUB_API_TOKEN=hex 64"              # 256 bits; server, portal, runner, xnet, agentichub
    "JWT_SIGNING_KEY=hex 40"            # 160 bits; the chart's is sha1 of 8 digits
    "SPACE_SESSION_SECRET_KEY=hex 40"
    "AGENTICFLOW_TOKEN=b64hex 32"       # the chart's shape: base64 of 32 hex digits (128 bits)
    "CASDOOR_CSGHUB_CLIENT_ID=hex 32"
    "CASDOOR_CSGHUB_CLIENT_SECRET=hex 40"
    "CASDOOR_ADMIN_CLIENT_ID=hex 32"
    "CASDOOR_ADMIN_CLIENT_SECRET=hex 40"
    "CASDOOR_CSGSHIP_CLIENT_ID=hex 32"
    "CASDOOR_CSGSHIP_CLIENT_SECRET=hex 40"
    "CASDOOR_RADIUS_SECRET=alnum 32"    # Casdoor's RADIUS listener (chart: the word "secret")
    # The HS256 key of the JWTs Gitaly and gitlab-shell present to csghub-server's internal API (chart and
    # csghub-server's default: "signing-key"); in TOML, YAML and an environment variable.
    "GITALY_JWT_SECRET=alnum 32"
)

# random_from ALPHABET N: N characters of ALPHABET (at most 256) from the kernel CSPRNG. A byte
# counts only below the largest multiple of the alphabet's size (the rest is dropped), so no
# character is favoured.
random_from() {
    local alphabet=$1 out="" bytes b size=${#1} limit
    limit=$((256 / size * size))
    while ((${#out} < $2)); do
        bytes=$(od -An -N64 -tu1 /dev/urandom)
        for b in $bytes; do
            ((b < limit)) && out+=${alphabet:$((b % size)):1}
        done
    done
    echo "${out:0:$2}"
}

# random_alnum N: N characters of [A-Za-z0-9].
random_alnum() {
    random_from ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 "$1"
}

# random_hex N: N hex digits (N/2 random bytes).
random_hex() {
    local hex
    hex=$(od -An -N$(($1 / 2)) -tx1 /dev/urandom)
    echo "${hex//[[:space:]]/}"
}

# new_secret KIND LENGTH
new_secret() {
    case "$1" in
        alnum) random_alnum "$2" ;;
        hex) random_hex "$2" ;;
        b64hex)
            local hex
            hex=$(random_hex "$2")
            b64 "$hex"
            echo
            ;;
        *)
            echo "secrets.sh: unknown secret kind '$1'" >&2
            return 1
            ;;
    esac
}

# bcrypt_hash PASSWORD: "$2a$10$..." as Go's bcrypt (registry htpasswd, Casdoor) reads it,
# through libcrypt (perl is part of every Debian system; Python is not on the guest).
bcrypt_hash() {
    local salt last hash canonical=.Oeu
    salt=$(random_from ./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 21)
    # The 22nd salt character carries only 2 bits: one of the four canonical ones.
    last=$(od -An -N1 -tu1 /dev/urandom)
    last=${last//[[:space:]]/}
    salt+=${CSGHUB_BCRYPT_LAST:-${canonical:$((last % 4)):1}}
    hash=$(PW="$1" SALT="\$2a\$10\$$salt" perl -e 'print crypt($ENV{PW}, $ENV{SALT}) // ""')
    if [[ ! "$hash" =~ ^\$2a\$10\$[./A-Za-z0-9]{53}$ ]]; then
        echo "secrets.sh: this system's crypt() cannot make bcrypt hashes (got '${hash:0:8}...')" >&2
        return 1
    fi
    echo "$hash"
}

# load_secrets: the variables of secrets.env (only NAME=value lines with safe characters).
load_secrets() {
    local line
    [[ -r "$CSGHUB_SECRETS_DIR/secrets.env" ]] || return 0
    while IFS= read -r line; do
        if [[ "$line" =~ ^([A-Z][A-Z0-9_]*)=([A-Za-z0-9./\$=+]*)$ ]]; then
            printf -v "${BASH_REMATCH[1]}" '%s' "${BASH_REMATCH[2]}"
        fi
    done <"$CSGHUB_SECRETS_DIR/secrets.env"
}

# make_secrets: secrets.env with every credential; keeps those already made (a first boot
# cut short keeps what it made). Prints changed:/ok:.
make_secrets() {
    local spec name kind length made=() value
    mkdir -p "$CSGHUB_SECRETS_DIR"
    chmod 0700 "$CSGHUB_SECRETS_DIR"
    load_secrets
    for spec in "${SECRET_SPECS[@]}"; do
        name=${spec%%=*}
        read -r kind length <<<"${spec#*=}"
        if [[ -z "${!name:-}" ]]; then
            value=$(new_secret "$kind" "$length")
            printf -v "$name" '%s' "$value"
            made+=("$name")
        fi
    done
    if [[ -z "${REGISTRY_HTPASSWD:-}" ]] || [[ " ${made[*]} " == *" REGISTRY_PASSWORD "* ]]; then
        REGISTRY_HTPASSWD=$(bcrypt_hash "$REGISTRY_PASSWORD") || return 1
        made+=(REGISTRY_HTPASSWD)
    fi
    # Casdoor's stored root password (Secret csghub-casdoor-init, INIT_ADMIN_HTPASSWD).
    if [[ -z "${CSGHUB_ADMIN_HTPASSWD:-}" ]] || [[ " ${made[*]} " == *" CSGHUB_ADMIN_PASSWORD "* ]]; then
        CSGHUB_ADMIN_HTPASSWD=$(bcrypt_hash "$CSGHUB_ADMIN_PASSWORD") || return 1
        made+=(CSGHUB_ADMIN_HTPASSWD)
    fi
    {
        echo "# This copy's CSGHub credentials, made by csghub-firstboot from /dev/urandom. Root only."
        for spec in "${SECRET_SPECS[@]}"; do
            name=${spec%%=*}
            printf '%s=%s\n' "$name" "${!name}"
        done
        printf 'REGISTRY_HTPASSWD=%s\n' "$REGISTRY_HTPASSWD"
        printf 'CSGHUB_ADMIN_HTPASSWD=%s\n' "$CSGHUB_ADMIN_HTPASSWD"
    } | install_if_changed -q - "$CSGHUB_SECRETS_DIR/secrets.env" 0600
    if ((${#made[@]})); then
        echo "changed: made ${#made[@]} credential(s) for this copy ($CSGHUB_SECRETS_DIR/secrets.env)"
    else
        echo "ok: CSGHub credentials already made for this copy"
    fi
}

# make_casdoor_cert NAME: a new RSA key pair and self-signed certificate for Casdoor's JWT cert
# NAME (csghub, csgship), instead of the pair every copy of the chart carries.
make_casdoor_cert() {
    local name=$1 key="$CSGHUB_SECRETS_DIR/casdoor-$1.key" crt="$CSGHUB_SECRETS_DIR/casdoor-$1.crt" tmp
    if [[ -s "$key" && -s "$crt" ]]; then
        echo "ok: Casdoor signing key '$name-cert' already made for this copy"
        return 0
    fi
    if ! command -v openssl >/dev/null; then
        echo "secrets.sh: openssl is missing; cannot make Casdoor's signing key" >&2
        return 1
    fi
    if [[ ! -s "$key" ]]; then
        tmp=$(mktemp "$key.XXXXXX")
        # PKCS#1 ("RSA PRIVATE KEY"), the form the chart's own key has.
        if ! openssl genrsa -traditional -out "$tmp" "$CASDOOR_KEY_BITS" 2>"$tmp.err"; then
            echo "secrets.sh: openssl genrsa failed: $(<"$tmp.err")" >&2
            rm -f "$tmp" "$tmp.err"
            return 1
        fi
        rm -f "$tmp.err"
        chmod 0600 "$tmp"
        mv -f "$tmp" "$key"
    fi
    tmp=$(mktemp "$crt.XXXXXX")
    if ! openssl req -new -x509 -key "$key" -out "$tmp" -days "$CASDOOR_CERT_DAYS" -sha256 \
        -subj "/O=admin/CN=$name-cert" -addext "basicConstraints=critical,CA:FALSE" 2>"$tmp.err"; then
        echo "secrets.sh: openssl req failed: $(<"$tmp.err")" >&2
        rm -f "$tmp" "$tmp.err"
        return 1
    fi
    rm -f "$tmp.err"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$crt"
    echo "changed: new Casdoor signing key and certificate '$name-cert' ($CASDOOR_KEY_BITS-bit RSA) for this copy"
}

b64() {
    printf '%s' "$1" | base64 -w0
}

# indent N < text
indent() {
    local pad
    printf -v pad '%*s' "$1" ''
    sed "s/^/$pad/"
}

# secret_values_yaml: the chart values this copy sets (top-level keys casdoor and server),
# for the HelmChartConfig's valuesContent (lib.sh's instance_manifest indents it).
secret_values_yaml() {
    local name
    echo "casdoor:"
    echo "  admin:"
    echo "    password: \"$CSGHUB_ADMIN_PASSWORD\""
    echo "  applianceCerts:"
    for name in csghub csgship; do
        echo "    $name:"
        echo "      certificate: |"
        indent 8 <"$CSGHUB_SECRETS_DIR/casdoor-$name.crt"
        echo "      privateKey: |"
        indent 8 <"$CSGHUB_SECRETS_DIR/casdoor-$name.key"
    done
    echo "  applianceRadiusSecret: \"$CASDOOR_RADIUS_SECRET\""
    echo "gitaly:"
    echo "  applianceJwtSecret: \"$GITALY_JWT_SECRET\""
    echo "server:"
    # csghub-server checks those JWTs with this key (csghub-server v2.4.0 common/config/config.go, GitalyServer.
    # JWTSecret). The chart passes server.environments only to the server's own Deployment and Job, as plain env
    # values (it has no Secret route for them); .Values.environments would put it in csghub-core, which every
    # CSGHub Deployment reads.
    echo "  environments:"
    echo "    STARHUB_SERVER_GITALY_JWT_SECRET: \"$GITALY_JWT_SECRET\""
    echo "  agenticflow:"
    echo "    token: \"$AGENTICFLOW_TOKEN\""
    echo "  xnet:"
    echo "    apiToken: \"$HUB_API_TOKEN\""
}

# helm_owned KIND NAME: the head of an object Helm adopts into the release on install.
helm_owned() {
    local release=${CSGHUB_HELMCHART_NAME:-csghub} namespace=${CSGHUB_NAMESPACE:-csghub}
    cat <<YAML
---
apiVersion: v1
kind: $1
metadata:
  name: $2
  namespace: $namespace
  labels:
    app.kubernetes.io/managed-by: Helm
  annotations:
    meta.helm.sh/release-name: $release
    meta.helm.sh/release-namespace: $namespace
YAML
}

# secrets_manifest: the objects the chart looks up and renders (chart 2.4.0 with the build's values:
# Redis without a password renders no csghub-redis Secret, the community edition no
# csghub-agenticflow), with this copy's values. The namespace comes first (kubectl creates in file order).
secrets_manifest() {
    local namespace=${CSGHUB_NAMESPACE:-csghub} b64_postgres_pw b64_minio_user b64_minio_pw b64_nats_user \
        b64_nats_pw b64_registry_user b64_registry_pw b64_registry_htpasswd b64_gitaly_token \
        b64_casdoor_client_id b64_casdoor_client_secret b64_admin_user b64_admin_pw b64_admin_htpasswd
    # base64 of each value first: a failure inside a $(...) argument would pass unnoticed.
    b64_postgres_pw=$(b64 "$POSTGRES_PASSWORD")
    b64_minio_user=$(b64 minio)
    b64_minio_pw=$(b64 "$MINIO_ROOT_PASSWORD")
    b64_nats_user=$(b64 natsadmin)
    b64_nats_pw=$(b64 "$NATS_PASSWORD")
    b64_registry_user=$(b64 registry)
    b64_registry_pw=$(b64 "$REGISTRY_PASSWORD")
    b64_registry_htpasswd=$(b64 "registry:$REGISTRY_HTPASSWD")
    b64_gitaly_token=$(b64 "$GITALY_TOKEN")
    b64_casdoor_client_id=$(b64 "$CASDOOR_ADMIN_CLIENT_ID")
    b64_casdoor_client_secret=$(b64 "$CASDOOR_ADMIN_CLIENT_SECRET")
    b64_admin_user=$(b64 root)
    b64_admin_pw=$(b64 "$CSGHUB_ADMIN_PASSWORD")
    b64_admin_htpasswd=$(b64 "$CSGHUB_ADMIN_HTPASSWD")
    cat <<YAML
# Written by csghub-firstboot: this copy's CSGHub credentials, in the objects the chart
# looks up before it would derive its own (docs/first-boot.md). Root only; do not edit.
apiVersion: v1
kind: Namespace
metadata:
  name: $namespace
YAML
    helm_owned Secret csghub-postgresql
    printf 'type: Opaque\ndata:\n  POSTGRES_PASSWORD: %s\n' "$b64_postgres_pw"
    helm_owned Secret csghub-minio
    printf 'type: Opaque\ndata:\n  MINIO_ROOT_USER: %s\n  MINIO_ROOT_PASSWORD: %s\n' \
        "$b64_minio_user" "$b64_minio_pw"
    helm_owned Secret csghub-nats
    printf 'type: Opaque\ndata:\n  NATS_USERNAME: %s\n  NATS_PASSWORD: %s\n' \
        "$b64_nats_user" "$b64_nats_pw"
    helm_owned Secret csghub-registry
    printf 'type: Opaque\ndata:\n  REGISTRY_USERNAME: %s\n  REGISTRY_PASSWORD: %s\n  htpasswd: %s\n' \
        "$b64_registry_user" "$b64_registry_pw" "$b64_registry_htpasswd"
    helm_owned Secret csghub-gitaly
    printf 'type: Opaque\ndata:\n  GITALY_TOKEN: %s\n' "$b64_gitaly_token"
    # Every key a template or NOTES.txt reads from it: NOTES.txt `b64dec`s INIT_ADMIN_PASSWORD and
    # fails the release when it is missing; the htpasswd (Casdoor's stored root password) would
    # otherwise be hashed again at every render.
    helm_owned Secret csghub-casdoor-init
    printf 'type: Opaque\ndata:\n  INIT_ADMIN_USER: %s\n  INIT_ADMIN_PASSWORD: %s\n  INIT_ADMIN_HTPASSWD: %s\n' \
        "$b64_admin_user" "$b64_admin_pw" "$b64_admin_htpasswd"
    printf '  CASDOOR_ADMIN_CLIENT_ID: %s\n  CASDOOR_ADMIN_CLIENT_SECRET: %s\n' \
        "$b64_casdoor_client_id" "$b64_casdoor_client_secret"
    helm_owned ConfigMap csghub-core
    cat <<YAML
data:
  CSGHUB_PORTAL_STARHUB_API_KEY: "$HUB_API_TOKEN"
  STARHUB_JWT_SIGNING_KEY: "$JWT_SIGNING_KEY"
  STARHUB_SERVER_SPACE_SESSION_SECRET_KEY: "$SPACE_SESSION_SECRET_KEY"
  STARHUB_SERVER_CASDOOR_CLIENT_ID: "$CASDOOR_CSGHUB_CLIENT_ID"
  STARHUB_SERVER_CASDOOR_CLIENT_SECRET: "$CASDOOR_CSGHUB_CLIENT_SECRET"
YAML
    helm_owned ConfigMap csghub-xnet
    cat <<YAML
data:
  STARHUB_SERVER_API_TOKEN: "$HUB_API_TOKEN"
  STARHUB_JWT_SIGNING_KEY: "$JWT_SIGNING_KEY"
YAML
    helm_owned ConfigMap csghub-runner
    printf 'data:\n  STARHUB_SERVER_API_TOKEN: "%s"\n' "$HUB_API_TOKEN"
    # AgenticHub's flows are enterprise-only: the community chart renders no csghub-agenticflow.
    if [[ "${CSGHUB_EDITION:-ce}" == ee ]]; then
        helm_owned ConfigMap csghub-agenticflow
        printf 'data:\n  FLOWS_ACCESS_TOKEN: "%s"\n' "$AGENTICFLOW_TOKEN"
    fi
    helm_owned ConfigMap csghub-casdoor
    cat <<YAML
data:
  init_data.json: |
    {"applications": [
      {"name": "CSGHub", "clientId": "$CASDOOR_CSGHUB_CLIENT_ID", "clientSecret": "$CASDOOR_CSGHUB_CLIENT_SECRET"},
      {"name": "Admin", "clientId": "$CASDOOR_ADMIN_CLIENT_ID", "clientSecret": "$CASDOOR_ADMIN_CLIENT_SECRET"},
      {"name": "CSGShip", "clientId": "$CASDOOR_CSGSHIP_CLIENT_ID", "clientSecret": "$CASDOOR_CSGSHIP_CLIENT_SECRET"}
    ]}
YAML
}

# patch_chart_casdoor_certs ARCHIVE: make the chart read Casdoor's JWT certificate and key
# from the values casdoor.applianceCerts.{csghub,csgship}.{certificate,privateKey}, the
# secret of Casdoor's RADIUS listener (port 1812 in its pod, reachable from every pod, users'
# Spaces included; it checks users' passwords) from casdoor.applianceRadiusSecret, and the
# key Gitaly and gitlab-shell sign their calls to csghub-server's internal API with (which
# hands out users' git tokens: docs/first-boot.md) from gitaly.applianceJwtSecret (and fail
# when they are missing) instead of the fixed text in its templates. The archive itself
# holds no secret: k3s serves server/static/ without authentication. All or nothing: the
# archive is replaced only once every file is patched.
patch_chart_casdoor_certs() {
    local archive=$1 work rc=0 current gitaly
    current=$(tar -xzOf "$archive" "$CHART_TOP/templates/casdoor/secret.yaml" 2>/dev/null || true)
    gitaly=$(tar -xzOf "$archive" "$CHART_TOP/templates/gitaly/configmap.yaml" 2>/dev/null || true)
    if [[ "$current" == *"$CHART_PATCH_MARK"* && "$gitaly" == *"$CHART_PATCH_MARK_GITALY"* ]]; then
        echo "ok: chart ${archive##*/} already reads this copy's Casdoor certificates and internal API secret"
        return 0
    fi
    work=$(mktemp -d)
    _patch_chart_in "$work" "$archive" || rc=$?
    rm -rf "$work"
    return "$rc"
}

# _patch_chart_in WORKDIR ARCHIVE (called in a condition: every step checks for itself)
_patch_chart_in() {
    local work=$1 archive=$2 top=$CHART_TOP configmap secret n
    tar -xzf "$archive" -C "$work" || return 1
    configmap="$work/$top/templates/casdoor/configmap.yaml"
    secret="$work/$top/templates/casdoor/secret.yaml"
    if [[ ! -f "$configmap" || ! -f "$secret" ]]; then
        echo "secrets.sh: ${archive##*/} has no templates/casdoor/{configmap,secret}.yaml; cannot replace Casdoor's certificate" >&2
        return 1
    fi
    n=$(awk -v bits="$CASDOOR_KEY_BITS" -v out="$configmap.new" '
        function value(name, field) {
            return "{{ dig \"applianceCerts\" \"" name "\" \"" field "\" \"\" .Values.casdoor | required \"casdoor.applianceCerts." name "." field " is missing: csghub-firstboot makes this copy'"'"'s Casdoor key\" | toJson }}"
        }
        /"name": "csghub-cert"/ { cert = "csghub" }
        /"name": "csgship-cert"/ { cert = "csgship" }
        cert != "" && /"bitSize": 4096,/ { sub(/4096/, bits) }
        cert != "" && /"certificate": "-----BEGIN CERTIFICATE-----/ {
            match($0, /^ */); print substr($0, 1, RLENGTH) "\"certificate\": " value(cert, "certificate") "," > out; n++; next
        }
        cert != "" && /"privateKey": "-----BEGIN RSA PRIVATE KEY-----/ {
            match($0, /^ */); print substr($0, 1, RLENGTH) "\"privateKey\": " value(cert, "privateKey") > out; n++; cert = ""; next
        }
        /^ *radiusSecret = "secret"$/ {
            match($0, /^ */)
            print substr($0, 1, RLENGTH) "radiusSecret = {{ dig \"applianceRadiusSecret\" \"\" .Values.casdoor | required \"casdoor.applianceRadiusSecret is missing: csghub-firstboot makes this copy'"'"'s RADIUS secret\" | quote }}" > out
            n++; next
        }
        { print > out }
        END { print n + 0 }
    ' "$configmap") || return 1
    if [[ "$n" != 5 ]]; then
        echo "secrets.sh: expected Casdoor's two fixed certificates and keys and its fixed RADIUS secret in templates/casdoor/configmap.yaml, found $n of 5 lines; chart changed?" >&2
        return 1
    fi
    mv -f "$configmap.new" "$configmap" || return 1
    n=$(awk -v out="$secret.new" '
        function value(field) {
            return "{{ dig \"applianceCerts\" \"csghub\" \"" field "\" \"\" .Values.casdoor | required \"casdoor.applianceCerts.csghub." field " is missing: csghub-firstboot makes this copy'"'"'s Casdoor key\" | b64enc }}"
        }
        /^  tls\.crt: LS0t/ { print "  tls.crt: " value("certificate") > out; n++; next }
        /^  tls\.key: LS0t/ { print "  tls.key: " value("privateKey") > out; n++; next }
        { print > out }
        END { print n + 0 }
    ' "$secret") || return 1
    if [[ "$n" != 2 ]]; then
        echo "secrets.sh: expected the fixed tls.crt/tls.key in templates/casdoor/secret.yaml, found $n of 2; chart changed?" >&2
        return 1
    fi
    mv -f "$secret.new" "$secret" || return 1
    _patch_gitaly_jwt_secret "$work/$top/templates/gitaly/configmap.yaml" 'secret = "signing-key"' 'secret = ' || return 1
    _patch_gitaly_jwt_secret "$work/$top/templates/gitlab-shell/configmap.yaml" 'secret: "signing-key"' 'secret: ' || return 1
    tar -czf "$archive.new" -C "$work" --owner=0 --group=0 --numeric-owner "$top" || return 1
    chmod 0644 "$archive.new" && mv -f "$archive.new" "$archive" || return 1
    echo "changed: chart ${archive##*/} now reads this copy's Casdoor certificates and internal API secret from its values (was: one fixed key pair and \"signing-key\" in every copy)"
}

# _patch_gitaly_jwt_secret TEMPLATE FIXED_LINE KEY: replace the one line FIXED_LINE (after its indent) of
# TEMPLATE by KEY and gitaly.applianceJwtSecret, quoted (a TOML and a YAML string alike); fail unless
# exactly one such line is there.
_patch_gitaly_jwt_secret() {
    local template=$1 n
    if [[ ! -f "$template" ]]; then
        echo "secrets.sh: the chart has no templates/${template#*/templates/}; cannot replace the internal API secret \"signing-key\"" >&2
        return 1
    fi
    n=$(awk -v fixed="$2" -v key="$3" -v out="$template.new" '
        substr($0, match($0, /[^ ]/)) == fixed && RSTART > 0 {
            print substr($0, 1, RSTART - 1) key "{{ dig \"applianceJwtSecret\" \"\" .Values.gitaly | required \"gitaly.applianceJwtSecret is missing: csghub-firstboot makes this copy'"'"'s internal API secret\" | quote }}" > out
            n++; next
        }
        { print > out }
        END { print n + 0 }
    ' "$template") || return 1
    if [[ "$n" != 1 ]]; then
        echo "secrets.sh: expected one fixed '$2' in templates/${template#*/templates/}, found $n; chart changed?" >&2
        rm -f "$template.new"
        return 1
    fi
    mv -f "$template.new" "$template"
}

# csghub_secrets: everything above, for an image that carries the CSGHub chart.
csghub_secrets() {
    local archive values manifest
    archive=$(compgen -G "$K3S_STATIC_CHARTS/csghub-*.tgz" | head -n1 || true)
    if [[ -z "$archive" ]]; then
        echo "ok: no CSGHub chart in this image; no CSGHub credentials to make"
        return 0
    fi
    make_secrets
    make_casdoor_cert csghub
    make_casdoor_cert csgship
    load_secrets
    values=$(secret_values_yaml)
    install_if_changed -q - "$CSGHUB_SECRETS_DIR/helm-values.yaml" 0600 <<<"$values"
    manifest=$(secrets_manifest)
    install_if_changed -q - "$CSGHUB_SECRETS_DIR/$PRECREATED_NAME" 0600 <<<"$manifest"
    if [[ "$FILE_CHANGED" == yes ]]; then
        echo "changed: objects the chart looks up hold this copy's credentials ($CSGHUB_SECRETS_DIR/$PRECREATED_NAME; csghub-ready creates them before the release)"
    else
        echo "ok: objects the chart looks up already hold this copy's credentials"
    fi
    if [[ -e "$K3S_MANIFESTS/$SECRETS_MANIFEST_NAME" ]]; then
        # k3s would re-apply it at every start, over what Helm owns.
        rm -f "$K3S_MANIFESTS/$SECRETS_MANIFEST_NAME"
        echo "changed: removed $K3S_MANIFESTS/$SECRETS_MANIFEST_NAME from k3s's auto-deploy folder"
    fi
    patch_chart_casdoor_certs "$archive"
}
