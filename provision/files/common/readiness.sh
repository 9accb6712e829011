# shellcheck shell=bash
# The readiness gate: CSGHub counts as ready only when it works, not when its pods run.
# Used by the build (provision/30-csghub.sh) and by every copy at every boot (csghub-ready),
# so both prove the same thing, each probe doing what a user does:
#   - the Helm release is deployed, and every Job of the release has completed
#     (csghub-server-migrate, csghub-casdoor-migrate, csghub-minio-init, the hook Jobs); a Job
#     seen failed stays failed for the gate after Kubernetes deletes it (ttlSecondsAfterFinished);
#   - every Deployment, StatefulSet and DaemonSet is ready (user spaces excepted), and every
#     KnativeServing reports Ready (spaces and inference run on Knative);
#   - the portal answers 200 on / through the gateway with the appliance's Host;
#   - csghub-server's API answers through the gateway (GET /api/v1/models: 200, "msg": "OK");
#   - the admin signs in through CSGHub's own OAuth flow: Casdoor's /api/login with type "code",
#     the client id and redirect URI of the portal's login URL (ConfigMap csghub-core), then the
#     code exchanged at Casdoor's token endpoint with csghub-server's client secret (same
#     ConfigMap), and the token's signature checked against the certificate csghub-server checks
#     tokens with (Secret csghub-casdoor-certs);
#   - the registry lets this copy's credentials in (GET /v2/ with Secret csghub-registry: 200);
#     then a second code exchanged by csghub-server's own callback (/api/v1/callback/casdoor), which
#     must redirect with CSGHub's JWT;
#   - a clone over SSH works: a throwaway key registered for the admin through CSGHub's API (with that
#     JWT), `git ls-remote` of a model repository made for it, both deleted after.
# A lockout or any answer that may change is "starting"; only a definite refusal is "failed".
# It also points k3s's containerd at CSGHub's own registry (registries.yaml with this copy's
# credentials, read from Secret csghub-registry), so spaces CSGHub builds can start.
#
# Sourced, never executed. Needs bash, curl, openssl, ssh, ssh-keygen and `k3s kubectl` only (no git:
# the clone probe speaks git's protocol over ssh itself; no Python on the guest).
# The decisions are pure functions (facts on stdin, one status line out) that
# tests/unit/test_readiness.py runs on the build host with canned facts; the probes around
# them only collect facts.
#
# The status line (banner, csghub-status, the build's error) is one of:
#   ready
#   starting (k/N): WHAT is pending
#   failed: WHAT — WHAT TO RUN

# install_if_changed, die, KC: the sourcing script has loaded them (30-csghub.sh, the first-boot
# lib.sh); sourced on its own (the unit tests) this file takes them from its sibling.
if ! declare -F install_if_changed >/dev/null; then
    # shellcheck source-path=SCRIPTDIR source=lib.sh
    . "${BASH_SOURCE[0]%/*}/lib.sh"
fi

GATE_RELEASE=${CSGHUB_HELMCHART_NAME:-csghub}
GATE_RELEASE_NS=${CSGHUB_NAMESPACE:-csghub}
GATE_HELMCHART_NS=${CSGHUB_HELMCHART_NAMESPACE:-kube-system}
# What the failure line tells the reader to run once the cause is fixed.
GATE_RETRY_HINT=${GATE_RETRY_HINT:-sudo csghub-status --retry}
# Namespaces whose pods are the users' (spaces CSGHub builds and runs), not the appliance's.
GATE_USER_NAMESPACES=${GATE_USER_NAMESPACES:-spaces}
# The chart's own names (chart 2.4.0, checked against a real render in tests/unit/test_readiness.py).
GATE_CASDOOR_SECRET=csghub-casdoor-init
GATE_CASDOOR_CERTS_SECRET=csghub-casdoor-certs
GATE_CORE_CONFIGMAP=csghub-core
GATE_REGISTRY_SECRET=csghub-registry
GATE_CASDOOR_ORG=OpenCSG
GATE_CASDOOR_APP=CSGHub
GATE_MARK="# csghub-appliance: in-cluster registry"

# --- pure decisions ------------------------------------------------------------------------

# job_facts < "NS/NAME CONDITIONS" lines (CONDITIONS: "Type=Status," repeated, maybe empty)
#   -> "job NS/NAME complete|failed|running" lines.
job_facts() {
    awk 'NF >= 1 { state = "running"
                  if ($2 ~ /(^|,)Complete=True/) state = "complete"
                  else if ($2 ~ /(^|,)Failed=True/) state = "failed"
                  print "job", $1, state }'
}

# workload_facts USER_NAMESPACES < "KIND NS/NAME KEY=VALUE..." lines -> "workload KIND NS/NAME
#   ready|waiting" lines; workloads in USER_NAMESPACES are left out. Keys (an empty value counts
#   as 0, an empty want as 1): want (replicas asked for), ready, gen (metadata.generation), seen
#   (status.observedGeneration), updated (replicas of the current pod template), total (a
#   Deployment's pods of any template). Ready as `kubectl rollout status` sees it: the controller
#   has seen the last change, every replica runs the current template and is ready, and no pod of
#   an older template is left. Ready pods alone are not enough: during a rollout (first boot's
#   upgrade, a reconfigure) the old pods stay ready and keep answering with the old Secrets, so a
#   new pod that never starts would pass, and an old one refusing the new credentials would fail.
workload_facts() {
    awk -v skip=" $1 " 'NF >= 2 { split($2, p, "/"); if (index(skip, " " p[1] " ")) next
                  split("", f)
                  for (i = 3; i <= NF; i++) { eq = index($i, "="); if (eq) f[substr($i, 1, eq - 1)] = substr($i, eq + 1) }
                  want = (f["want"] == "" ? 1 : f["want"] + 0)
                  ok = (f["ready"] + 0 >= want && f["updated"] + 0 >= want && f["seen"] + 0 >= f["gen"] + 0)
                  if ($1 == "Deployment" && f["total"] + 0 > f["updated"] + 0) ok = 0
                  print "workload", $1, $2, (ok ? "ready" : "waiting") }'
}

# with_remembered_failures RECORD < "job NS/NAME STATE" lines -> the same lines, plus "job NS/NAME
# failed" for each Job in RECORD (names seen failed before, one per line) that is gone now: a
# failed Job is deleted after its ttlSecondsAfterFinished (300 s in chart 2.4.0) and must not then
# count as done. A Job of that name that exists again (a retry) speaks for itself.
with_remembered_failures() {
    awk -v record="$1" 'BEGIN { n = split(record, r, "\n") }
        { print; seen[$2] = 1 }
        END { for (i = 1; i <= n; i++) if (r[i] != "" && !(r[i] in seen)) { print "job", r[i], "failed"; seen[r[i]] = 1 } }'
}

# pull_facts USER_NAMESPACES < "NS/POD IMAGE=REASON ..." lines (one per pod, one word per
#   container) -> "pull NS/POD IMAGE REASON" for each container that cannot get its image.
pull_facts() {
    awk -v skip=" $1 " '{ split($1, p, "/"); if (index(skip, " " p[1] " ")) next
        for (i = 2; i <= NF; i++) { n = split($i, w, "="); reason = w[n]
            if (reason ~ /^(ErrImagePull|ImagePullBackOff|ErrImageNeverPull|InvalidImageName)$/) {
                image = substr($i, 1, length($i) - length(reason) - 1); print "pull", $1, image, reason } } }'
}

# json_field NAME < JSON -> the value of the first string field NAME (escapes kept as sent), or
# nothing. Enough for Casdoor's flat answers; no jq on the guest.
json_field() {
    sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\(\([^\"\\\\]\|\\\\.\)*\)\".*/\1/;T;p;q"
}

# casdoor_code_outcome < Casdoor's /api/login answer to a type "code" sign-in (Casdoor v3.62.0,
# controllers/auth.go; messages from object/check.go, object/token_oauth_util.go, with the
# chart's enableErrorMask) -> "code CODE" | "waiting WHY" | "password WHAT" (the admin's password
# was refused) | "refused WHAT". Only a definite refusal is "password" or "refused"; a lockout (five
# wrong passwords from anyone) ends by itself.
casdoor_code_outcome() {
    local body status msg code
    body=$(cat)
    status=$(json_field status <<<"$body")
    msg=$(json_field msg <<<"$body")
    code=$(json_field data <<<"$body")
    if [[ "$status" == ok && "$code" =~ ^[A-Za-z0-9._-]+$ ]]; then
        echo "code $code"
        return 0
    fi
    case "$msg" in
        *"too many times"*) echo "waiting Casdoor has locked the admin after failed sign-ins ($msg)" ;;
        "Invalid client_id"*)
            echo "refused Casdoor knows no application with the portal's client id (ConfigMap $GATE_CORE_CONFIGMAP, CSGHUB_PORTAL_LOGIN_URL): $msg" ;;
        "Redirect URI"*)
            echo "refused Casdoor does not allow the portal's redirect URI (ConfigMap $GATE_CORE_CONFIGMAP, CSGHUB_PORTAL_LOGIN_URL): $msg" ;;
        "password or code is incorrect"* | "The user: "*"doesn't exist"*)
            echo "password the admin's password (Secret $GATE_CASDOOR_SECRET) was refused: $msg" ;;
        *"does not exist"* | *"forbidden"* | *"is not supported"* | *"disabled"* | *"not enabled"*)
            echo "refused Casdoor refused the sign-in: $msg" ;;
        *) echo "waiting Casdoor answered: ${msg:-${body:0:120}}" ;;
    esac
}

# casdoor_token_outcome HTTP_CODE < the token endpoint's answer (Casdoor v3.62.0,
# object/token_oauth.go; 401 for invalid_client, controllers/util.go) -> "token JWT" |
# "refused WHAT" | "waiting WHY".
casdoor_token_outcome() {
    local body token error description
    body=$(cat)
    token=$(json_field access_token <<<"$body")
    error=$(json_field error <<<"$body")
    description=$(json_field error_description <<<"$body")
    if [[ "$1" == 200 && "$token" =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]]; then
        echo "token $token"
    elif [[ "$error" == invalid_client ]]; then
        echo "refused Casdoor refused csghub-server's OAuth client secret (ConfigMap $GATE_CORE_CONFIGMAP, STARHUB_SERVER_CASDOOR_CLIENT_SECRET): $description"
    else
        echo "waiting Casdoor's token endpoint answered HTTP $1${error:+ $error}"
    fi
}

# b64url_decode TEXT -> the bytes (base64url without padding, as in a JWT).
b64url_decode() {
    local s=${1//-/+}
    s=${s//_//}
    while ((${#s} % 4)); do s+="="; done
    base64 -d <<<"$s" 2>/dev/null
}

# jwt_signed_by TOKEN CERT_FILE: whether TOKEN's RS256/RS512 signature verifies with the public
# key of the PEM certificate CERT_FILE (what csghub-server does with Casdoor's token).
jwt_signed_by() {
    local token=$1 cert=$2 head payload sig header alg digest dir rc=0
    IFS=. read -r head payload sig <<<"$token"
    [[ -n "$head" && -n "$payload" && -n "$sig" ]] || return 1
    header=$(b64url_decode "$head") || return 1
    alg=$(json_field alg <<<"$header")
    case "$alg" in
        RS256) digest=-sha256 ;;
        RS512) digest=-sha512 ;;
        *) return 1 ;;
    esac
    dir=$(mktemp -d) || return 1
    if openssl x509 -in "$cert" -pubkey -noout >"$dir/key.pem" 2>/dev/null &&
        b64url_decode "$sig" >"$dir/sig"; then
        printf '%s.%s' "$head" "$payload" |
            openssl dgst "$digest" -verify "$dir/key.pem" -signature "$dir/sig" >/dev/null 2>&1 || rc=1
    else
        rc=1
    fi
    rm -rf "$dir"
    return "$rc"
}

# url_query_value NAME URL -> the raw value of query parameter NAME in URL (first one), or nothing.
url_query_value() {
    local pair query=${2#*\?}
    local -a pairs=()
    [[ "$2" == *\?* ]] || return 0
    IFS='&' read -r -a pairs <<<"$query"
    for pair in "${pairs[@]}"; do
        if [[ "$pair" == "$1="* ]]; then
            printf '%s' "${pair#*=}"
            return 0
        fi
    done
}

# url_encode TEXT -> TEXT percent-encoded for a query string (RFC 3986 unreserved kept).
url_encode() {
    local LC_ALL=C s=$1 i c out=""
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case "$c" in
            [A-Za-z0-9.~_-]) out+=$c ;;
            *) printf -v c '%%%02X' "'$c"; out+=$c ;;
        esac
    done
    printf '%s' "$out"
}

# json_string TEXT -> TEXT as a JSON string literal (quotes included). Control characters are
# refused: no credential the chart makes contains one.
json_string() {
    local s=$1
    if [[ "$s" =~ [[:cntrl:]] ]]; then
        return 1
    fi
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

# casdoor_code_login_body USER PASSWORD -> the JSON the portal's sign-in page sends to Casdoor's
# /api/login for CSGHub's application (organization OpenCSG, application CSGHub, as chart 2.4.0
# seeds them): a password sign-in that asks for an OAuth code.
casdoor_code_login_body() {
    local user pass
    user=$(json_string "$1") && pass=$(json_string "$2") || return 1
    printf '{"type":"code","organization":"%s","application":"%s","username":%s,"password":%s,"autoSignin":true,"signinMethod":"Password"}\n' \
        "$GATE_CASDOOR_ORG" "$GATE_CASDOOR_APP" "$user" "$pass"
}

# casdoor_token_body CLIENT_ID CLIENT_SECRET CODE REDIRECT_URI -> the token request
# (authorization_code grant). The redirect URI of the sign-in goes with it, as RFC 6749 4.1.3 asks:
# newer Casdoor reads it from the token request (controllers/token.go, TokenRequest.RedirectUri)
# to check it against the code's; older ones ignore the field.
casdoor_token_body() {
    local id secret code redirect
    id=$(json_string "$1") && secret=$(json_string "$2") && code=$(json_string "$3") &&
        redirect=$(json_string "$4") || return 1
    printf '{"grant_type":"authorization_code","client_id":%s,"client_secret":%s,"code":%s,"redirect_uri":%s}\n' \
        "$id" "$secret" "$code" "$redirect"
}

# registry_state CODE CHALLENGE PUSH: the registry's answer to GET /v2/ with this copy's
# credentials, and how a push and pull with them went (gate_registry_push_pull's word)
# -> ok (200, pushed) | refused (401 with a Basic challenge: the htpasswd does not take them) |
# pushrefused (a push step answered 401) | waiting.
registry_state() {
    if [[ "$1" == 200 && "${3:-}" == pushed ]]; then
        echo ok
    elif [[ "$1" == 200 && "${3:-}" == refused ]]; then
        echo pushrefused
    elif [[ "$1" == 401 && "$2" == Basic* ]]; then
        echo refused
    else
        echo waiting
    fi
}

# knative_facts < "NS/NAME READY_STATUS" lines (KnativeServing objects) -> "knative NS/NAME
# ready|waiting" lines, or "knative none" when there is none.
knative_facts() {
    awk 'NF >= 1 { n++; print "knative", $1, ($2 == "True" ? "ready" : "waiting") }
         END { if (!n) print "knative none" }'
}

# yaml_string TEXT -> TEXT as a double-quoted YAML scalar.
yaml_string() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

# registries_yaml HOST USER PASSWORD: k3s's registries.yaml for CSGHub's registry, which the
# gateway serves over plain HTTP at HOST (the appliance's domain and HTTP port).
registries_yaml() {
    local host user pass
    host=$(yaml_string "$1")
    user=$(yaml_string "$2")
    pass=$(yaml_string "$3")
    cat <<YAML
# Written by csghub-appliance (csghub-ready, csghub-reconfigure): CSGHub's own registry, so
# that containerd can pull the images CSGHub builds. Credentials: Secret csghub/csghub-registry.
mirrors:
  $host:
    endpoint:
      - "http://$1"
configs:
  $host:
    auth:
      username: $user
      password: $pass
YAML
}

# hosts_with_registry NODE_IP DOMAIN < /etc/hosts -> /etc/hosts with one marked line mapping
# DOMAIN to the node address (containerd on the node resolves the registry host with it; a
# nip.io or *.localhost name may have no DNS answer offline). Other lines are kept as they are.
hosts_with_registry() {
    grep -vF "$GATE_MARK" || true
    printf '%s %s %s\n' "$1" "$2" "$GATE_MARK"
}

# gate_hint CHECK SUBJECT -> the command that shows why CHECK (on SUBJECT) is not done.
gate_hint() {
    local check=$1 subject=${2:-} ns name kind
    case "$check" in
        api) echo "sudo systemctl status k3s; sudo journalctl -u k3s" ;;
        release) echo "sudo k3s kubectl -n $GATE_HELMCHART_NS logs job/helm-install-$GATE_RELEASE" ;;
        job)
            ns=${subject%%/*} name=${subject#*/}
            echo "sudo k3s kubectl -n $ns logs job/$name"
            ;;
        workload)
            kind=${subject%% *} subject=${subject#* }
            ns=${subject%%/*} name=${subject#*/}
            echo "sudo k3s kubectl -n $ns describe ${kind,,} $name"
            ;;
        pull)
            echo "sudo k3s ctr -n k8s.io images ls | grep ${subject##* } (the image is missing from this image store)"
            ;;
        portal) echo "sudo k3s kubectl -n $GATE_RELEASE_NS logs deploy/csghub-portal" ;;
        server) echo "sudo k3s kubectl -n $GATE_RELEASE_NS logs deploy/csghub-server" ;;
        knative) echo "sudo k3s kubectl get knativeservings.operator.knative.dev -A -o yaml" ;;
        login) echo "sudo k3s kubectl -n $GATE_RELEASE_NS logs deploy/csghub-casdoor" ;;
        gitssh) echo "sudo k3s kubectl -n $GATE_RELEASE_NS logs deploy/csghub-gitlab-shell" ;;
        registry) echo "sudo k3s kubectl -n $GATE_RELEASE_NS logs deploy/csghub-registry" ;;
        *) echo "sudo k3s kubectl get pods -A" ;;
    esac
}

# gate_verdict < facts -> the status line. Facts, one per line:
#   api up|down
#   release deployed|installing|failed [DETAIL]
#   job NS/NAME complete|running|failed
#   workload KIND NS/NAME ready|waiting
#   pull NS/POD IMAGE REASON       a container that cannot get its image
#   knative NS/NAME ready|waiting  a KnativeServing and its Ready condition ("knative none": none yet)
#   portal CODE                    HTTP status of / through the gateway (000: no answer)
#   server CODE OK|-               csghub-server's GET /api/v1/models through the gateway, and its "msg"
#   login ok|changed|waiting WHY|refused WHAT|down   the admin's sign-in through CSGHub's OAuth flow
#                                  ("changed": proved on this copy before, refused now: the admin
#                                  changed the password, which CSGHub lets them do)
#   gitssh ok|skipped|waiting WHY|refused WHAT|down  git's ref listing over SSH with a key registered
#                                  through CSGHub's API ("down": no sign-in to register it with;
#                                  "skipped": the sign-in is "changed", see login)
#   registry CODE CHALLENGE PUSH...  GET /v2/ with this copy's credentials: status and WWW-Authenticate
#                                  scheme, then the push and pull of a test image: pushed | refused STEP |
#                                  waiting STEP STATUS (- when /v2/ did not answer 200)
#   offline yes                    no internet: a missing image is final
#   expired yes                    the deadline passed: what is still pending has failed
gate_verdict() {
    local kind a b c rest push total=0 done_count=0 pending="" pending_check="" pending_subject=""
    local failed="" offline=no expired=no
    local -a lines=()
    mapfile -t lines
    local line
    for line in "${lines[@]}"; do
        read -r kind rest <<<"$line"
        case "$kind" in
            offline) [[ "$rest" == yes ]] && offline=yes ;;
            expired) [[ "$rest" == yes ]] && expired=yes ;;
            *) ;; # a fact this part does not read
        esac
    done
    # _gate_pend CHECK SUBJECT TEXT: note the first thing still pending.
    _gate_pend() {
        if [[ -z "$pending" ]]; then
            pending=$3 pending_check=$1 pending_subject=$2
        fi
    }
    # _gate_fail CHECK SUBJECT TEXT: note the first thing that failed (it decides the line).
    _gate_fail() {
        [[ -n "$failed" ]] || failed="failed: $3 — $(gate_hint "$1" "$2"); then $GATE_RETRY_HINT"
    }
    for line in "${lines[@]}"; do
        read -r kind a b c <<<"$line"
        case "$kind" in
            api)
                total=$((total + 1))
                if [[ "$a" == up ]]; then done_count=$((done_count + 1)); else _gate_pend api "" "the cluster API"; fi
                ;;
            release)
                total=$((total + 1))
                case "$a" in
                    deployed) done_count=$((done_count + 1)) ;;
                    failed) _gate_fail release "" "the Helm release $GATE_RELEASE_NS/$GATE_RELEASE did not install${b:+ (${line#release failed })}" ;;
                    *) _gate_pend release "" "the Helm release $GATE_RELEASE_NS/$GATE_RELEASE" ;;
                esac
                ;;
            job)
                total=$((total + 1))
                case "$b" in
                    complete) done_count=$((done_count + 1)) ;;
                    failed) _gate_fail job "$a" "job $a failed" ;;
                    *) _gate_pend job "$a" "job $a" ;;
                esac
                ;;
            workload)
                total=$((total + 1))
                if [[ "$c" == ready ]]; then
                    done_count=$((done_count + 1))
                else
                    _gate_pend workload "$a $b" "${a,,} $b"
                fi
                ;;
            pull)
                if [[ "$offline" == yes ]]; then
                    _gate_fail pull "$a $b" "image $b of pod $a is not in the image store ($c)"
                else
                    _gate_pend pull "$a $b" "pulling image $b for $a"
                fi
                ;;
            knative)
                total=$((total + 1))
                case "$b" in
                    ready) done_count=$((done_count + 1)) ;;
                    waiting) _gate_pend knative "" "KnativeServing $a to report Ready" ;;
                    *) _gate_pend knative "" "a KnativeServing (the Knative operator makes it)" ;;
                esac
                ;;
            portal)
                total=$((total + 1))
                # The portal renders / itself (200); a redirect there is not the portal answering.
                if [[ "$a" == 200 ]]; then
                    done_count=$((done_count + 1))
                else
                    _gate_pend portal "" "the portal through the gateway (HTTP ${a:-000})"
                fi
                ;;
            server)
                total=$((total + 1))
                if [[ "$a" == 200 && "$b" == OK ]]; then
                    done_count=$((done_count + 1))
                else
                    _gate_pend server "" "csghub-server's API through the gateway (HTTP ${a:-000})"
                fi
                ;;
            login)
                total=$((total + 1))
                case "$a" in
                    ok | changed) done_count=$((done_count + 1)) ;;
                    refused) _gate_fail login "" "the admin's sign-in through CSGHub's OAuth flow failed: ${line#login refused }" ;;
                    waiting) _gate_pend login "" "the admin's sign-in through CSGHub's OAuth flow (${line#login waiting })" ;;
                    *) _gate_pend login "" "the admin's sign-in through CSGHub's OAuth flow" ;;
                esac
                ;;
            gitssh)
                total=$((total + 1))
                case "$a" in
                    ok | skipped) done_count=$((done_count + 1)) ;;
                    refused) _gate_fail gitssh "" "a clone over SSH failed: ${line#gitssh refused }" ;;
                    waiting) _gate_pend gitssh "" "a clone over SSH (${line#gitssh waiting })" ;;
                    *) _gate_pend gitssh "" "a clone over SSH (after the admin's sign-in)" ;;
                esac
                ;;
            registry)
                total=$((total + 1))
                read -r _ _ _ push <<<"$line"
                case "$(registry_state "$a" "$b" "${push%% *}")" in
                    ok) done_count=$((done_count + 1)) ;;
                    pushrefused) _gate_fail registry "" "the registry let this copy's credentials read but refused a push (${push#refused }: HTTP 401)" ;;
                    refused) _gate_fail registry "" "the registry refused this copy's credentials (Secret $GATE_REGISTRY_SECRET: its htpasswd does not take REGISTRY_PASSWORD)" ;;
                    *)
                        if [[ "$a" == 200 ]]; then
                            _gate_pend registry "" "a push and pull of a test image to the registry (${push#waiting })"
                        else
                            _gate_pend registry "" "the registry's /v2/ with this copy's credentials (HTTP ${a:-000})"
                        fi
                        ;;
                esac
                ;;
            *) ;; # a fact this part does not read
        esac
    done
    if [[ -n "$failed" ]]; then
        echo "$failed"
    elif [[ -z "$pending" && $total -gt 0 ]]; then
        echo ready
    elif [[ "$expired" == yes ]]; then
        local hint
        hint=$(gate_hint "$pending_check" "$pending_subject")
        echo "failed: ${pending:-nothing answered} not ready in time — $hint; then $GATE_RETRY_HINT"
    else
        echo "starting ($done_count/$total): waiting for ${pending:-the cluster}"
    fi
}

# --- probes (side effects: they ask the cluster and the node's ports) ------------------------

_gate_kc() { k3s kubectl --request-timeout=20s "$@"; }

# gate_secret_value NAME KEY -> the decoded value, or nothing.
gate_secret_value() {
    local encoded
    encoded=$(_gate_kc -n "$GATE_RELEASE_NS" get secret "$1" -o "jsonpath={.data.$2}" 2>/dev/null) || return 0
    [[ -n "$encoded" ]] && base64 -d <<<"$encoded" 2>/dev/null
    return 0
}

# gate_release_fact: "release deployed|installing|failed DETAIL" from the HelmChart and its Job.
gate_release_fact() {
    local job failed restarts succeeded
    job=$(_gate_kc -n "$GATE_HELMCHART_NS" get helmchart "$GATE_RELEASE" -o 'jsonpath={.status.jobName}' 2>/dev/null || true)
    failed=$(_gate_kc -n "$GATE_HELMCHART_NS" get helmchart "$GATE_RELEASE" \
        -o 'jsonpath={.status.conditions[?(@.type=="Failed")].status}' 2>/dev/null || true)
    if [[ "$failed" == True ]]; then
        echo "release failed HelmChart $GATE_HELMCHART_NS/$GATE_RELEASE reports Failed"
        return 0
    fi
    if [[ -z "$job" ]]; then
        echo "release installing"
        return 0
    fi
    succeeded=$(_gate_kc -n "$GATE_HELMCHART_NS" get job "$job" -o 'jsonpath={.status.succeeded}' 2>/dev/null || true)
    if [[ "${succeeded:-0}" -ge 1 ]] 2>/dev/null; then
        echo "release deployed"
        return 0
    fi
    # The Job restarts its pod in place (restartPolicy OnFailure); with failurePolicy abort a
    # failed release makes every restart fail again ("waiting for operator intervention").
    restarts=$(_gate_kc -n "$GATE_HELMCHART_NS" get pods -l "job-name=$job" \
        -o 'jsonpath={range .items[*]}{.status.containerStatuses[0].restartCount}{"\n"}{end}' 2>/dev/null |
        sort -n | tail -n1 || true) # no pod yet: no restarts
    if [[ "${restarts:-0}" -ge 3 ]] 2>/dev/null; then
        echo "release failed job $job failed $restarts times"
    else
        echo "release installing"
    fi
}

# _gate_curl ARGS...: curl straight to the node address. No proxy from the environment (it would
# get the admin's password and the registry's credentials, and --resolve does not apply through
# it) and no ~/.curlrc (-q, which must come first): every option the probes rely on is theirs.
_gate_curl() { curl -q --noproxy '*' "$@"; }

# gate_http_code HOST PATH: the status code for http://HOST:PORT/PATH through the node address,
# with the Host header a browser sends.
gate_http_code() {
    local code
    # curl writes 000 itself when nothing answered (and exits non-zero).
    code=$(_gate_curl -sS -o /dev/null -w '%{http_code}' --max-time 15 \
        --resolve "$1:$CSGHUB_HTTP_PORT:$K3S_NODE_IP" "http://$1:$CSGHUB_HTTP_PORT$2" 2>/dev/null) || true
    echo "${code:-000}"
}

# gate_configmap_value NAME KEY -> the value, or nothing.
gate_configmap_value() {
    _gate_kc -n "$GATE_RELEASE_NS" get configmap "$1" -o "jsonpath={.data.${2//./\\.}}" 2>/dev/null || true
}

# _gate_curl_config USER PASSWORD -> a curl config (read from stdin with -K -) that sends them as
# Basic credentials: a password never goes on a command line.
_gate_curl_config() {
    local u=${1//\\/\\\\} p=${2//\\/\\\\}
    u=${u//\"/\\\"} p=${p//\"/\\\"}
    printf 'user = "%s:%s"\n' "$u" "$p"
}

# gate_registry_fact HOST -> "registry CODE SCHEME PUSH": GET /v2/ with this copy's credentials,
# then (on 200) a push and pull of a test image with them (gate_registry_push_pull).
gate_registry_fact() {
    local user pass headers code scheme push
    user=$(gate_secret_value "$GATE_REGISTRY_SECRET" REGISTRY_USERNAME)
    pass=$(gate_secret_value "$GATE_REGISTRY_SECRET" REGISTRY_PASSWORD)
    if [[ -z "$user" || -z "$pass" ]]; then
        echo "registry 000 -"
        return 0
    fi
    headers=$(_gate_curl_config "$user" "$pass" | _gate_curl -sS -o /dev/null -D - --max-time 15 -K - \
        --resolve "$1:$CSGHUB_HTTP_PORT:$K3S_NODE_IP" "http://$1:$CSGHUB_HTTP_PORT/v2/" 2>/dev/null | tr -d '\r') || true
    code=$(awk 'NR == 1 { print $2 }' <<<"$headers")
    scheme=$(awk 'tolower($1) == "www-authenticate:" { print $2; exit }' <<<"$headers")
    push=-
    [[ "$code" != 200 ]] || push=$(gate_registry_push_pull "$1" "$user" "$pass")
    echo "registry ${code:-000} ${scheme:--} $push"
}

# The image the gate pushes and pulls: one empty layer, always the same bytes, so a push at every
# boot stores nothing new.
GATE_REGISTRY_REPO=csghub-appliance/readiness
GATE_REGISTRY_TAG=probe
_GATE_MANIFEST_TYPE=application/vnd.docker.distribution.manifest.v2+json

# _gate_registry_call CURL_CONFIG METHOD URL BODY_FILE|- OUT_FILE [HEADER...] -> the answer's
# headers (CR removed). The credentials come in CURL_CONFIG, on curl's stdin.
_gate_registry_call() {
    local config=$1 method=$2 url=$3 body=$4 out=$5 header
    local -a args=(-sS -X "$method" -o "$out" -D - --max-time 30 -K - -H 'Expect:'
        --resolve "${url#http://}")
    args[-1]=${args[-1]%%/*}
    args[-1]=${args[-1]}:$K3S_NODE_IP
    [[ "$body" == - ]] || args+=(--data-binary "@$body")
    shift 5
    for header in "$@"; do args+=(-H "$header"); done
    printf '%s' "$config" | _gate_curl "${args[@]}" "$url" 2>/dev/null | tr -d '\r' || true
}

# _gate_header NAME < headers -> the value of the last header NAME (case-insensitive), or nothing;
# _gate_status < headers -> the status of the last answer (000 when none).
_gate_header() { awk -v n="${1,,}:" 'tolower($1) == n { v = $2 } END { print v }'; }

# _gate_sha256 FILE -> its SHA-256 (hex); _gate_size FILE -> its size in bytes.
_gate_sha256() {
    local sum
    sum=$(sha256sum <"$1") || return 1
    echo "${sum%% *}"
}
_gate_size() {
    local size
    size=$(wc -c <"$1") || return 1
    echo "$((size))"
}
_gate_status() { awk '/^HTTP\// { c = $2 } END { print (c == "" ? "000" : c) }'; }

# _gate_upload_blob CONFIG BASE FILE -> "ok" or "STATUS STEP": a monolithic blob upload (POST
# /v2/REPO/blobs/uploads/, then PUT the bytes to its Location with ?digest=).
_gate_upload_blob() {
    local config=$1 base=$2 file=$3 digest headers status location
    digest=sha256:$(_gate_sha256 "$file") || return 1
    headers=$(_gate_registry_call "$config" POST "$base/v2/$GATE_REGISTRY_REPO/blobs/uploads/" - /dev/null)
    status=$(_gate_status <<<"$headers")
    if [[ "$status" != 202 ]]; then
        echo "$status upload"
        return 0
    fi
    location=$(_gate_header Location <<<"$headers")
    [[ "$location" == /* ]] && location=$base$location
    [[ "$location" == *\?* ]] && location+="&digest=$digest" || location+="?digest=$digest"
    headers=$(_gate_registry_call "$config" PUT "$location" "$file" /dev/null 'Content-Type: application/octet-stream')
    status=$(_gate_status <<<"$headers")
    [[ "$status" == 201 ]] && echo ok || echo "$status blob"
}

# gate_registry_push_pull HOST USER PASSWORD -> "pushed" | "refused STEP" (401: the credentials
# were refused) | "waiting STEP STATUS": push a one-layer image to CSGHub's registry (both blobs
# and the manifest) and pull it back (the manifest by tag, with the digest pushed, and the layer),
# with this copy's credentials, through the gateway, as `docker push`/`pull` do.
gate_registry_push_pull() {
    local base=http://$1:$CSGHUB_HTTP_PORT config dir step status headers layer_digest diff_id config_digest config_size layer_size answer
    config=$(_gate_curl_config "$2" "$3")
    dir=$(mktemp -d) || {
        echo "waiting tmp 000"
        return 0
    }
    # An empty tar, compressed without a name or time: the same bytes every time.
    if ! { tar -cf "$dir/layer.tar" -T /dev/null && gzip -n -c "$dir/layer.tar" >"$dir/layer" &&
        layer_digest=sha256:$(_gate_sha256 "$dir/layer") && diff_id=sha256:$(_gate_sha256 "$dir/layer.tar") &&
        printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
            "$diff_id" >"$dir/config" && config_digest=sha256:$(_gate_sha256 "$dir/config") &&
        config_size=$(_gate_size "$dir/config") && layer_size=$(_gate_size "$dir/layer") &&
        printf '{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":%d,"digest":"%s"},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":%d,"digest":"%s"}]}' \
            "$_GATE_MANIFEST_TYPE" "$config_size" "$config_digest" "$layer_size" "$layer_digest" >"$dir/manifest"; }; then
        rm -rf "$dir"
        echo "waiting making-the-test-image 000"
        return 0
    fi
    answer=""
    for step in layer config; do
        status=$(_gate_upload_blob "$config" "$base" "$dir/$step")
        if [[ "$status" != ok ]]; then
            answer="${status%% *} $step-${status#* }"
            break
        fi
    done
    if [[ -z "$answer" ]]; then
        headers=$(_gate_registry_call "$config" PUT "$base/v2/$GATE_REGISTRY_REPO/manifests/$GATE_REGISTRY_TAG" \
            "$dir/manifest" /dev/null "Content-Type: $_GATE_MANIFEST_TYPE")
        status=$(_gate_status <<<"$headers")
        [[ "$status" == 201 ]] || answer="$status manifest-push"
    fi
    if [[ -z "$answer" ]]; then
        headers=$(_gate_registry_call "$config" GET "$base/v2/$GATE_REGISTRY_REPO/manifests/$GATE_REGISTRY_TAG" \
            - "$dir/pulled" "Accept: $_GATE_MANIFEST_TYPE")
        status=$(_gate_status <<<"$headers")
        if [[ "$status" != 200 ]]; then
            answer="$status manifest-pull"
        elif ! cmp -s "$dir/manifest" "$dir/pulled"; then
            answer="200 manifest-pull-differs"
        fi
    fi
    if [[ -z "$answer" ]]; then
        headers=$(_gate_registry_call "$config" GET "$base/v2/$GATE_REGISTRY_REPO/blobs/$layer_digest" - "$dir/pulled")
        status=$(_gate_status <<<"$headers")
        if [[ "$status" != 200 ]]; then
            answer="$status layer-pull"
        elif ! cmp -s "$dir/layer" "$dir/pulled"; then
            answer="200 layer-pull-differs"
        fi
    fi
    rm -rf "$dir"
    if [[ -z "$answer" ]]; then
        echo pushed
    elif [[ "${answer%% *}" == 401 ]]; then
        echo "refused ${answer#* }"
    else
        echo "waiting ${answer#* } ${answer%% *}"
    fi
}

# gate_server_fact HOST -> "server CODE OK|-": one request through the gateway to csghub-server's API.
gate_server_fact() {
    local answer code msg
    answer=$(_gate_curl -sS --max-time 15 -w '\n%{http_code}' --resolve "$1:$CSGHUB_HTTP_PORT:$K3S_NODE_IP" \
        "http://$1:$CSGHUB_HTTP_PORT/api/v1/models?page=1&per=1" 2>/dev/null) || answer=$'\n000'
    code=${answer##*$'\n'}
    msg=$(json_field msg <<<"${answer%$'\n'*}")
    echo "server ${code:-000} ${msg:--}"
}

# _gate_casdoor_post HOST PATH -> the answer's body, a newline, and its HTTP status (body on stdin:
# passwords and secrets never go on a command line).
_gate_casdoor_post() {
    _gate_curl -sS --max-time 20 -H 'Content-Type: application/json' --data-binary @- -w '\n%{http_code}' \
        --resolve "$1:$CSGHUB_HTTP_PORT:$K3S_NODE_IP" "http://$1:$CSGHUB_HTTP_PORT$2" 2>/dev/null || printf '\n000'
}

# gate_login_fact CASDOOR_HOST DOMAIN -> "login ok|waiting WHY|refused WHAT|down": the admin signs in
# as the portal's sign-in does (Casdoor's /api/login, type "code", with the client id and redirect URI
# of CSGHUB_PORTAL_LOGIN_URL), the code is exchanged at Casdoor's token endpoint with
# csghub-server's client secret, and the token must be signed by the certificate csghub-server
# checks tokens with; then a second code goes to csghub-server's own callback, which must answer
# with CSGHub's JWT (kept in _GATE_HUB_JWT for the git probe).
gate_login_fact() {
    local user pass login_url client_id redirect secret cert_b64 body answer code outcome token dir query client_id_q redirect_q
    local fingerprint="" record="" location
    user=$(gate_secret_value "$GATE_CASDOOR_SECRET" INIT_ADMIN_USER)
    pass=$(gate_secret_value "$GATE_CASDOOR_SECRET" INIT_ADMIN_PASSWORD)
    # The admin may change the password the Secret holds (CSGHub's profile page, Casdoor's admin
    # page): once it signed in on this copy and is refused later, that is what happened, not a
    # broken copy. GATE_SIGNIN_RECORD (csghub-ready sets it; the build does not) remembers, per
    # user and password (a SHA-256 fingerprint, never the password), "proved" or "changed"; after
    # "changed" the gate stops trying that password: each try would count towards Casdoor's lockout.
    if [[ -n "${GATE_SIGNIN_RECORD:-}" && -n "$user" && -n "$pass" ]]; then
        fingerprint=$(printf '%s\n%s' "$user" "$pass" | sha256sum)
        fingerprint=${fingerprint%% *}
        record=$(cat "$GATE_SIGNIN_RECORD" 2>/dev/null || true)
        if [[ "$record" == "changed $fingerprint" ]]; then
            _GATE_LOGIN_CHANGED=yes
            echo "login changed"
            return 0
        fi
    fi
    login_url=$(gate_configmap_value "$GATE_CORE_CONFIGMAP" CSGHUB_PORTAL_LOGIN_URL)
    secret=$(gate_configmap_value "$GATE_CORE_CONFIGMAP" STARHUB_SERVER_CASDOOR_CLIENT_SECRET)
    cert_b64=$(_gate_kc -n "$GATE_RELEASE_NS" get secret "$GATE_CASDOOR_CERTS_SECRET" \
        -o 'jsonpath={.data.tls\.crt}' 2>/dev/null || true)
    client_id=$(url_query_value client_id "$login_url")
    redirect=$(url_query_value redirect_uri "$login_url")
    if [[ -z "$user" || -z "$pass" || -z "$client_id" || -z "$redirect" || -z "$secret" || -z "$cert_b64" ]]; then
        echo "login down"
        return 0
    fi
    body=$(casdoor_code_login_body "$user" "$pass") || {
        echo "login refused the admin's credentials hold a control character"
        return 0
    }
    client_id_q=$(url_encode "$client_id")
    redirect_q=$(url_encode "$redirect")
    query="clientId=$client_id_q&responseType=code&redirectUri=$redirect_q&scope=read&state=casdoor"
    answer=$(_gate_casdoor_post "$1" "/api/login?$query" <<<"$body")
    if [[ "${answer##*$'\n'}" != 200 ]]; then
        echo "login down"
        return 0
    fi
    outcome=$(casdoor_code_outcome <<<"${answer%$'\n'*}")
    if [[ "$outcome" == "password "* ]]; then
        if [[ -n "$fingerprint" && "$record" == "proved $fingerprint" ]]; then
            _gate_signin_record "changed $fingerprint"
            _GATE_LOGIN_CHANGED=yes
            echo "login changed"
        else
            echo "login refused ${outcome#password }"
        fi
        return 0
    fi
    if [[ "$outcome" != "code "* ]]; then
        echo "login $outcome"
        return 0
    fi
    code=${outcome#code }
    body=$(casdoor_token_body "$client_id" "$secret" "$code" "$redirect") || {
        echo "login refused csghub-server's client secret holds a control character"
        return 0
    }
    answer=$(_gate_casdoor_post "$1" /api/login/oauth/access_token <<<"$body")
    outcome=$(casdoor_token_outcome "${answer##*$'\n'}" <<<"${answer%$'\n'*}")
    if [[ "$outcome" != "token "* ]]; then
        echo "login $outcome"
        return 0
    fi
    token=${outcome#token }
    dir=$(mktemp -d) || {
        echo "login waiting no temporary folder"
        return 0
    }
    base64 -d <<<"$cert_b64" >"$dir/cert.pem" 2>/dev/null || true
    if ! jwt_signed_by "$token" "$dir/cert.pem"; then
        rm -rf "$dir"
        echo "login refused Casdoor's token is not signed by the certificate csghub-server checks tokens with (Secret $GATE_CASDOOR_CERTS_SECRET, tls.crt)"
        return 0
    fi
    rm -rf "$dir"
    [[ -z "$fingerprint" || "$record" == "proved $fingerprint" ]] || _gate_signin_record "proved $fingerprint"
    # Then the sign-in a browser finishes: a second code, exchanged by csghub-server's own callback with the
    # secret csghub-server holds (a code is good once). Its JWT is what the git probe uses CSGHub's API with.
    body=$(casdoor_code_login_body "$user" "$pass") || true # it made the same body above
    answer=$(_gate_casdoor_post "$1" "/api/login?$query" <<<"$body")
    outcome=$(casdoor_code_outcome <<<"${answer%$'\n'*}")
    if [[ "${answer##*$'\n'}" != 200 || "$outcome" != "code "* ]]; then
        echo "login waiting a second sign-in for csghub-server's callback (${outcome#* })"
        return 0
    fi
    location=$(gate_callback_location "$2" "${outcome#code }")
    outcome=$(callback_outcome "$location")
    if [[ "$outcome" == "jwt "* ]]; then
        _GATE_HUB_JWT=${outcome#jwt }
        echo "login ok"
    else
        echo "login $outcome"
    fi
}

# gate_callback_location DOMAIN CODE -> the Location csghub-server's OAuth callback answers with (not followed),
# or nothing.
# The URL (with the one-time code) goes in a curl config on stdin, never on a command line (ps shows those).
gate_callback_location() {
    local headers status
    headers=$(printf 'url = "http://%s:%s/api/v1/callback/casdoor?code=%s&state=casdoor"\n' \
        "$1" "$CSGHUB_HTTP_PORT" "$(url_encode "$2")" |
        _gate_curl -sS -o /dev/null -D - --max-time 30 -K - --resolve "$1:$CSGHUB_HTTP_PORT:$K3S_NODE_IP" \
            2>/dev/null | tr -d '\r') || true
    status=$(_gate_status <<<"$headers")
    if [[ "$status" == 302 ]]; then _gate_header Location <<<"$headers"; fi
}

# url_decode TEXT -> TEXT with %XX and + decoded (a backslash in TEXT stays one).
url_decode() {
    local s=${1//+/ }
    s=${s//\\/\\\\}
    printf '%b' "${s//%/\\x}"
}

# callback_outcome LOCATION < nothing -> "jwt TOKEN" | "refused WHAT" | "waiting WHY": where csghub-server's
# GET /api/v1/callback/casdoor sent the browser (csghub-server v2.4.0-ce user/handler/user.go Casdoor: 302 to
# the portal with ?jwt=, or to its error page with error_message="failed to signin: ..."; user/component/user.go
# Signin: the code exchanged by Casdoor's SDK, oauth2's error text). invalid_client there means csghub-server
# holds another client secret than Casdoor's application (its environment, from ConfigMap csghub-core when the
# pod started).
callback_outcome() {
    local jwt message
    jwt=$(url_query_value jwt "$1")
    message=$(url_query_value error_message "$1")
    message=$(url_decode "$message")
    if [[ "$jwt" =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]]; then
        echo "jwt $jwt"
    elif [[ "$message" == *invalid_client* ]]; then
        echo "refused csghub-server's own sign-in (its callback /api/v1/callback/casdoor) was refused by Casdoor: csghub-server holds another client secret than Casdoor's application CSGHub (STARHUB_SERVER_CASDOOR_CLIENT_SECRET as csghub-server loaded it): $message"
    elif [[ -n "$message" ]]; then
        echo "waiting csghub-server's callback: $message"
    else
        echo "waiting csghub-server's callback (/api/v1/callback/casdoor) sent no JWT"
    fi
}

# _gate_signin_record LINE: replace GATE_SIGNIN_RECORD's content with LINE (root only).
# A record that cannot be written only costs the leniency it would give.
_gate_signin_record() {
    if mkdir -p "${GATE_SIGNIN_RECORD%/*}" && (umask 077 && printf '%s\n' "$1" >"$GATE_SIGNIN_RECORD.tmp"); then
        mv -f "$GATE_SIGNIN_RECORD.tmp" "$GATE_SIGNIN_RECORD" || true
    fi
}

# The repository the git probe clones, made for the admin through CSGHub's API and deleted after.
GATE_GIT_REPO=csghub-appliance-readiness
# The SSH user of CSGHub's clone URLs (gitlab-sshd's, chart 2.4.0 templates/gitlab-shell/configmap.yaml).
GATE_GIT_SSH_USER=${GATE_GIT_SSH_USER:-git}

# _gate_hub_call METHOD PATH [BODY_FILE] [ANSWER_FILE] -> the HTTP status of an API call to csghub-server through
# the gateway as the signed-in admin (the JWT goes in a curl config on stdin, never on a command line).
_gate_hub_call() {
    local -a args=(-sS -o "${4:-/dev/null}" -w '%{http_code}' --max-time 30 -X "$1" -K -
        --resolve "$GATE_DOMAIN:$CSGHUB_HTTP_PORT:$K3S_NODE_IP")
    [[ -z "${3:-}" ]] || args+=(-H 'Content-Type: application/json' --data-binary "@$3")
    printf 'header = "Authorization: Bearer %s"\n' "$_GATE_HUB_JWT" |
        _gate_curl "${args[@]}" "http://$GATE_DOMAIN:$CSGHUB_HTTP_PORT$2" 2>/dev/null || true
}

# jwt_claim NAME TOKEN -> the string claim NAME of a JWT's payload (not verified: the gate only reads
# which user csghub-server signed in).
jwt_claim() {
    local payload
    IFS=. read -r _ payload _ <<<"$2"
    payload=$(b64url_decode "$payload") || return 0
    json_field "$1" <<<"$payload"
}

# git_outcome EXIT_STATUS < ssh's stderr from the upload-pack exchange -> "ok" | "refused WHAT" | "waiting WHY".
git_outcome() {
    local err
    err=$(cat)
    if [[ "$1" == 0 ]]; then
        echo ok
    elif [[ "$err" == *"Permission denied (publickey"* ]]; then
        echo "refused gitlab-shell did not let in the admin's SSH key registered through CSGHub's API: it could not look the key up in csghub-server's internal API (its JWT secret, gitaly.applianceJwtSecret in gitlab-shell's config.yml, differs from csghub-server's STARHUB_SERVER_GITALY_JWT_SECRET)"
    elif [[ "$err" == *"could not be found"* || "$err" == *"does not appear to be a git repository"* ]]; then
        echo "refused git over SSH let the admin in but found no repository $GATE_GIT_REPO just made through CSGHub's API (gitlab-shell and csghub-server disagree on where repositories live, or Gitaly lost it)"
    else
        err=$(head -n1 <<<"$err")
        echo "waiting git over SSH: ${err:-exit $1}"
    fi
}

# How many polls in a row gitlab-shell must refuse the admin's key before the gate calls it definite: gitlab-shell
# also refuses a key when its call to csghub-server's internal API fails for a moment (issue 23).
GATE_GIT_REFUSALS_TO_FAIL=${GATE_GIT_REFUSALS_TO_FAIL:-3}

# _gate_git_refusal_count -> how many polls in a row gitlab-shell refused the key, this one counted (the count
# lives in the file GATE_GIT_REFUSALS between polls, as the failed Jobs do; without it each refusal is the first).
_gate_git_refusal_count() {
    local n=0
    if [[ -z "${GATE_GIT_REFUSALS:-}" ]]; then
        echo 1
        return 0
    fi
    n=$(cat "$GATE_GIT_REFUSALS" 2>/dev/null) || n=0
    [[ "$n" =~ ^[0-9]+$ ]] || n=0
    n=$((n + 1))
    { mkdir -p "${GATE_GIT_REFUSALS%/*}" && printf '%s\n' "$n" >"$GATE_GIT_REFUSALS"; } 2>/dev/null || true
    echo "$n"
}

# _gate_git_leftover WHAT: note that the probe could not delete WHAT from CSGHub (in the file GATE_GIT_LEFTOVERS,
# which the build fails on and first boot logs as a warning).
_gate_git_leftover() {
    if [[ -n "${GATE_GIT_LEFTOVERS:-}" ]]; then
        { mkdir -p "${GATE_GIT_LEFTOVERS%/*}" && printf '%s\n' "$1" >>"$GATE_GIT_LEFTOVERS"; } 2>/dev/null || true
    fi
    echo "warning: the clone probe could not delete $1" >&2
}

# _gate_git_cleanup: the probe's EXIT trap: delete the repository and the key it made (checking the answers),
# and its folder, however the probe ends (finished, failed, or the gate killed mid-probe).
_gate_git_cleanup() {
    local code
    if [[ -n "${_probe_repo:-}" ]]; then
        code=$(_gate_hub_call DELETE "/api/v1/models/$_probe_user/$GATE_GIT_REPO")
        [[ "$code" == 200 || "$code" == 204 ]] ||
            _gate_git_leftover "the repository models/$_probe_user/$GATE_GIT_REPO (DELETE answered HTTP $code)"
    fi
    if [[ -n "${_probe_key:-}" ]]; then
        code=$(_gate_hub_call DELETE "/api/v1/user/$_probe_user/ssh_key/$_probe_key")
        [[ "$code" == 200 || "$code" == 204 ]] ||
            _gate_git_leftover "the SSH key $_probe_key of $_probe_user (DELETE answered HTTP $code)"
    fi
    [[ -z "${_probe_dir:-}" ]] || rm -rf "$_probe_dir"
}

# gate_git_fact DOMAIN -> "gitssh ok|skipped|waiting WHY|refused WHAT|down": what a user does to clone over SSH. A
# throwaway key (made in a private temporary folder, removed after) is registered for the admin through
# CSGHub's API (POST /api/v1/user/USER/ssh_keys, csghub-server v2.4.0-ce api/handler/sshkey.go) with the JWT of
# the admin's sign-in, after deleting any such key an earlier, interrupted run left (GET .../ssh_keys); a private
# model repository is made (POST /api/v1/models); its refs are read over SSH at the git NodePort as
# `git ls-remote` reads them, where gitlab-sshd asks csghub-server's internal API whose key it is (with the
# internal API's JWT); then the repository and the key are deleted again, whatever happens (an EXIT trap).
# gitlab-shell refusing the key counts as definite only GATE_GIT_REFUSALS_TO_FAIL polls in a row.
gate_git_fact() {
    local user outcome n
    GATE_DOMAIN=$1
    # The admin changed the password after a sign-in proved on this copy: the gate cannot sign in to
    # register a key, and does not hold that against the copy (as for the sign-in itself).
    if [[ "${_GATE_LOGIN_CHANGED:-}" == yes ]]; then
        echo "gitssh skipped"
        return 0
    fi
    if [[ -z "${_GATE_HUB_JWT:-}" ]]; then
        echo "gitssh down"
        return 0
    fi
    user=$(jwt_claim current_user "$_GATE_HUB_JWT")
    [[ "$user" =~ ^[A-Za-z0-9_.-]+$ ]] || {
        echo "gitssh waiting csghub-server's sign-in named no user"
        return 0
    }
    [[ -z "${GATE_GIT_LEFTOVERS:-}" ]] || : >"$GATE_GIT_LEFTOVERS" 2>/dev/null || true
    outcome=$(_gate_git_probe "$user")
    if [[ "$outcome" == "refused gitlab-shell did not let in"* ]]; then
        n=$(_gate_git_refusal_count)
        if ((n < GATE_GIT_REFUSALS_TO_FAIL)); then
            outcome="waiting gitlab-shell refused the admin's SSH key ($n of $GATE_GIT_REFUSALS_TO_FAIL polls in a row before the gate calls it definite)"
        fi
    elif [[ -n "${GATE_GIT_REFUSALS:-}" ]]; then
        rm -f "$GATE_GIT_REFUSALS"
    fi
    echo "gitssh ${outcome:-waiting the clone probe was interrupted}"
}

# _gate_git_probe USER -> git_outcome's line, or "waiting WHY": the probe's body, in a subshell whose EXIT trap
# deletes what it made.
_gate_git_probe() (
    local rc=0 outcome code key_json pub user_json repo_json first made stale
    _probe_user=$1 _probe_dir="" _probe_key="" _probe_repo=""
    trap _gate_git_cleanup EXIT
    trap 'exit 143' TERM INT HUP
    _probe_dir=$(mktemp -d) || {
        echo "waiting no temporary folder"
        exit 0
    }
    # Keys an earlier run left (the gate killed mid-probe, a DELETE that failed): csghub-server v2.4.0-ce
    # api/router/api.go GET /user/:username/ssh_keys, api/handler/sshkey.go Index: {"data": [{"name", ...}]}.
    code=$(_gate_hub_call GET "/api/v1/user/$_probe_user/ssh_keys" "" "$_probe_dir/keys.json")
    if [[ "$code" != 200 ]]; then
        echo "waiting CSGHub's API answered HTTP $code listing the admin's SSH keys"
        exit 0
    fi
    grep -oE "\"name\": *\"$GATE_GIT_REPO-[0-9a-f]+\"" "$_probe_dir/keys.json" |
        grep -oE "$GATE_GIT_REPO-[0-9a-f]+" >"$_probe_dir/stale" || true
    while read -r stale; do
        code=$(_gate_hub_call DELETE "/api/v1/user/$_probe_user/ssh_key/$stale" </dev/null)
        [[ "$code" == 200 || "$code" == 204 ]] ||
            _gate_git_leftover "the SSH key $stale of $_probe_user an earlier run left (DELETE answered HTTP $code)"
    done <"$_probe_dir/stale"
    stale=$(od -An -N6 -tx1 /dev/urandom) || stale=$RANDOM$RANDOM
    stale=$GATE_GIT_REPO-${stale//[[:space:]]/}
    if ! ssh-keygen -q -t ed25519 -N '' -C "$stale" -f "$_probe_dir/key" </dev/null >/dev/null 2>&1; then
        echo "waiting ssh-keygen failed"
        exit 0
    fi
    # Every value here is made by the gate or checked above: json_string cannot refuse one.
    key_json=$(json_string "$stale") || true
    pub=$(<"$_probe_dir/key.pub")
    pub=$(json_string "$pub") || true
    printf '{"name":%s,"content":%s}' "$key_json" "$pub" >"$_probe_dir/key.json"
    user_json=$(json_string "$_probe_user") || true
    repo_json=$(json_string "$GATE_GIT_REPO") || true
    printf '{"namespace":%s,"name":%s,"nickname":%s,"private":true,"license":"apache-2.0"}' \
        "$user_json" "$repo_json" "$repo_json" >"$_probe_dir/repo.json"
    code=$(_gate_hub_call POST "/api/v1/user/$_probe_user/ssh_keys" "$_probe_dir/key.json")
    if [[ "$code" != 200 ]]; then
        if [[ "$code" == 401 ]]; then
            echo "refused csghub-server did not take the JWT its own sign-in gave (HTTP 401 registering an SSH key)"
        else
            echo "waiting CSGHub's API answered HTTP $code registering an SSH key"
        fi
        exit 0
    fi
    _probe_key=$stale
    # csghub-server v2.4.0-ce api/handler/model.go Create answers 400 for a repository that exists (left by an
    # interrupted run: cloned and deleted all the same); anything else but success may change: waiting.
    made=$(_gate_hub_call POST /api/v1/models "$_probe_dir/repo.json")
    case "$made" in
        200 | 201 | 400 | 409) _probe_repo=yes ;;
        *)
            echo "waiting CSGHub's API answered HTTP $made making the repository $GATE_GIT_REPO"
            exit 0
            ;;
    esac
    # What `git ls-remote` sends over SSH (git's protocol v0): upload-pack on the clone path, which answers with
    # its refs as pkt-lines; the flush packet "0000" ends the exchange. No git needed on the node.
    printf '0000' >"$_probe_dir/flush"
    timeout 60 ssh -F /dev/null -i "$_probe_dir/key" -o IdentitiesOnly=yes -o BatchMode=yes \
        -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 -o LogLevel=ERROR \
        -p "${CSGHUB_GIT_SSH_PORT:-30022}" -- "$GATE_GIT_SSH_USER@$K3S_NODE_IP" \
        "git-upload-pack '/models/$_probe_user/$GATE_GIT_REPO.git'" \
        <"$_probe_dir/flush" >"$_probe_dir/refs" 2>"$_probe_dir/git.err" || rc=$?
    # The first pkt-line: four hex digits of length and an object id, or only the flush packet (no refs yet).
    first=$(head -c 44 "$_probe_dir/refs") || first=""
    if ((rc == 0)) && ! [[ "$first" =~ ^([0-9a-f]{4}[0-9a-f]{40}|0000)$ ]]; then
        rc=1
        echo "upload-pack sent no refs" >>"$_probe_dir/git.err"
    fi
    outcome=$(git_outcome "$rc" <"$_probe_dir/git.err")
    # A create that did not say it made the repository, then no repository: not proof that git lost it.
    if [[ "$made" != 20[01] && "$outcome" == "refused git over SSH let the admin in but found no repository"* ]]; then
        outcome="waiting CSGHub's API answered HTTP $made making the repository $GATE_GIT_REPO, and git over SSH found none"
    fi
    echo "$outcome"
)

# gate_casdoor_host: the login service's host name, from its HTTPRoute.
gate_casdoor_host() {
    _gate_kc -n "$GATE_RELEASE_NS" get httproutes -o 'jsonpath={range .items[*]}{range .spec.hostnames[*]}{@}{"\n"}{end}{end}' \
        2>/dev/null | grep -m1 '^casdoor\.' || true
}

# gate_facts DOMAIN: every fact gate_verdict needs, from the live cluster and ports. The admin
# login is tried only once every job and workload is done: Casdoor locks an account after
# repeated failed logins, and a half-started stack would only produce noise.
gate_facts() {
    local domain=$1 release jobs workloads casdoor portal failed_seen recorded
    if ! _gate_kc get --raw /readyz >/dev/null 2>&1; then
        echo "api down"
        return 0
    fi
    echo "api up"
    release=$(gate_release_fact)
    echo "$release"
    [[ "$release" == "release deployed" ]] || return 0
    jobs=$(_gate_kc get jobs -A -l "app.kubernetes.io/instance=$GATE_RELEASE" \
        -o 'jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {range .status.conditions[*]}{.type}={.status},{end}{"\n"}{end}' \
        2>/dev/null | job_facts || true) # the API failing: no facts, the gate keeps waiting
    if [[ -n "${GATE_FAILED_JOBS:-}" ]]; then
        failed_seen=$(awk '$1 == "job" && $3 == "failed" { print $2 }' <<<"$jobs")
        if [[ -n "$failed_seen" ]]; then
            mkdir -p "${GATE_FAILED_JOBS%/*}"
            { cat "$GATE_FAILED_JOBS" 2>/dev/null || true; printf '%s\n' "$failed_seen"; } | sort -u \
                >"$GATE_FAILED_JOBS.tmp" && mv -f "$GATE_FAILED_JOBS.tmp" "$GATE_FAILED_JOBS"
        fi
        if [[ -s "$GATE_FAILED_JOBS" ]]; then
            recorded=$(<"$GATE_FAILED_JOBS")
            jobs=$(with_remembered_failures "$recorded" <<<"$jobs")
        fi
    fi
    workloads=$({
        _gate_kc get deployments,statefulsets -A \
            -o 'jsonpath={range .items[*]}{.kind} {.metadata.namespace}/{.metadata.name} want={.spec.replicas} ready={.status.readyReplicas} gen={.metadata.generation} seen={.status.observedGeneration} updated={.status.updatedReplicas} total={.status.replicas}{"\n"}{end}' || true
        _gate_kc get daemonsets -A \
            -o 'jsonpath={range .items[*]}{.kind} {.metadata.namespace}/{.metadata.name} want={.status.desiredNumberScheduled} ready={.status.numberReady} gen={.metadata.generation} seen={.status.observedGeneration} updated={.status.updatedNumberScheduled}{"\n"}{end}' || true
    } 2>/dev/null | workload_facts "$GATE_USER_NAMESPACES")
    [[ -n "$jobs" ]] && echo "$jobs"
    [[ -n "$workloads" ]] && echo "$workloads"
    _gate_kc get pods -A \
        -o 'jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{range .status.initContainerStatuses[*]} {.image}={.state.waiting.reason}{end}{range .status.containerStatuses[*]} {.image}={.state.waiting.reason}{end}{"\n"}{end}' \
        2>/dev/null | pull_facts "$GATE_USER_NAMESPACES" || true
    # Knative's operator installs the KnativeServing CRD with the release; without it (Knative
    # left out of this build) there is nothing to wait for.
    if _gate_kc get crd knativeservings.operator.knative.dev >/dev/null 2>&1; then
        _gate_kc get knativeservings.operator.knative.dev -A \
            -o 'jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
            2>/dev/null | knative_facts || true
    fi
    portal=$(gate_http_code "$domain" /)
    echo "portal $portal"
    gate_server_fact "$domain"
    casdoor=$(gate_casdoor_host)
    if [[ -z "$workloads" || -z "$casdoor" ]] || grep -qE '^(job .* (running|failed)|workload .* waiting)$' <<<"$jobs"$'\n'"$workloads"; then
        echo "login down"
    else
        gate_login_fact "$casdoor" "$domain"
    fi
    gate_git_fact "$domain"
    gate_registry_fact "$domain"
}

# --- registries.yaml and /etc/hosts ------------------------------------------------------------

K3S_REGISTRIES=${K3S_REGISTRIES:-/etc/rancher/k3s/registries.yaml}
GATE_HOSTS_FILE=${GATE_HOSTS_FILE:-/etc/hosts}

# sync_registries DOMAIN: write registries.yaml for the registry at DOMAIN:PORT with the
# credentials the cluster holds, and the /etc/hosts line for DOMAIN; restart k3s only when
# registries.yaml changed (k3s reads it only at start). Returns 0 when done (changed or not),
# 2 when the credentials are not there yet (the release is still installing).
sync_registries() {
    local domain=$1 user pass host=$1:$CSGHUB_HTTP_PORT hosts yaml
    user=$(gate_secret_value "$GATE_REGISTRY_SECRET" REGISTRY_USERNAME)
    pass=$(gate_secret_value "$GATE_REGISTRY_SECRET" REGISTRY_PASSWORD)
    if [[ -z "$user" || -z "$pass" ]]; then
        echo "ok: registry credentials not there yet (Secret $GATE_RELEASE_NS/$GATE_REGISTRY_SECRET)"
        return 2
    fi
    if [[ -n "${K3S_NODE_IP:-}" ]]; then
        hosts=$(hosts_with_registry "$K3S_NODE_IP" "$domain" <"$GATE_HOSTS_FILE")
        install_if_changed -q - "$GATE_HOSTS_FILE" 0644 <<<"$hosts" || return 1
        if [[ "$FILE_CHANGED" == yes ]]; then
            echo "changed: $GATE_HOSTS_FILE maps $domain to $K3S_NODE_IP (the registry host, for containerd)"
        fi
    fi
    yaml=$(registries_yaml "$host" "$user" "$pass")
    install_if_changed -q - "$K3S_REGISTRIES" 0600 <<<"$yaml" || return 1
    if [[ "$FILE_CHANGED" == yes ]]; then
        echo "changed: $K3S_REGISTRIES names the registry $host with this copy's credentials"
        if systemctl -q is-active k3s.service; then
            systemctl restart k3s.service
            echo "changed: restarted k3s to read $K3S_REGISTRIES"
        fi
    else
        echo "ok: $K3S_REGISTRIES already names the registry $host"
    fi
}

# --- the gate loop ------------------------------------------------------------------------------

# readiness_gate DOMAIN TIMEOUT STATE_FILE [offline]
# Collects facts and decides until ready, failed, or TIMEOUT seconds passed (then failed);
# writes each new status line to STATE_FILE (and prints it with a "progress:" prefix) and
# calls the function gate_on_change, if defined. Reports by GATE_VERDICT (the last status line:
# "ready" or "failed: ..."), not by exit status; returns 0 either way.
readiness_gate() {
    local domain=$1 timeout=$2 state=$3 offline=${4:-} deadline facts verdict last="" last_print=0 registries=pending rc leftovers
    deadline=$((SECONDS + timeout))
    # Where the Jobs seen failed are remembered (beside the state file; delete_finished_jobs forgets them).
    GATE_FAILED_JOBS=${GATE_FAILED_JOBS:-${state%/*}/failed-jobs}
    # The clone probe's refusals in a row and what it could not delete: each run of the gate starts afresh.
    GATE_GIT_REFUSALS=${GATE_GIT_REFUSALS:-${state%/*}/git-refusals}
    GATE_GIT_LEFTOVERS=${GATE_GIT_LEFTOVERS:-${state%/*}/git-leftovers}
    rm -f "$GATE_GIT_REFUSALS" "$GATE_GIT_LEFTOVERS"
    while :; do
        facts=$(gate_facts "$domain" 2>/dev/null)
        if [[ "$registries" == pending && "$facts" == *"release deployed"* ]]; then
            rc=0
            sync_registries "$domain" || rc=$?
            ((rc == 0)) && registries=synced
        fi
        [[ "$offline" == offline ]] && facts+=$'\noffline yes'
        ((SECONDS >= deadline)) && facts+=$'\nexpired yes'
        verdict=$(gate_verdict <<<"$facts")
        if [[ "$verdict" != "$last" ]]; then
            mkdir -p "${state%/*}"
            printf '%s\n' "$verdict" >"$state.tmp" && mv -f "$state.tmp" "$state"
            echo "progress: $verdict"
            last=$verdict last_print=$SECONDS
            if declare -F gate_on_change >/dev/null; then gate_on_change || true; fi
        elif ((SECONDS - last_print >= 60)); then
            # A sign of life for whoever reads the log (the build's runner) during long waits.
            echo "progress: $verdict"
            last_print=$SECONDS
        fi
        # shellcheck disable=SC2034  # read by the caller
        GATE_VERDICT=$verdict
        case "$verdict" in
            ready | failed:*)
                if [[ -s "$GATE_GIT_LEFTOVERS" ]]; then
                    leftovers=$(paste -sd ';' "$GATE_GIT_LEFTOVERS") || leftovers=$GATE_GIT_LEFTOVERS
                    echo "warning: the clone probe could not delete from CSGHub: $leftovers"
                fi
                return 0
                ;;
            *) ;; # starting: wait
        esac
        sleep "${GATE_POLL_SECONDS:-10}"
    done
}

# gate_failed_jobs_file: where the gate remembers the Jobs it saw failed (beside its state file:
# /run, so a reboot forgets them with the rest).
gate_failed_jobs_file() {
    local state=${CSGHUB_READINESS:-/run/csghub-appliance/readiness}
    echo "${GATE_FAILED_JOBS:-${state%/*}/failed-jobs}"
}

# --- keeping the release upgradable (csghub-reconfigure, csghub-status --retry) -----------------

# _gate_release_jobs: "NS/NAME CONDITIONS" for every Job of the release.
_gate_release_jobs() {
    _gate_kc get jobs -A -l "app.kubernetes.io/instance=$GATE_RELEASE" \
        -o 'jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {range .status.conditions[*]}{.type}={.status},{end}{"\n"}{end}'
}

# delete_finished_jobs [TIMEOUT]: delete the release's Jobs once none is running (waiting at
# most TIMEOUT seconds, default 600). A finished Job stays for its ttlSecondsAfterFinished
# (300 s in chart 2.4.0) and its pod template is immutable: an upgrade that changes it (a
# domain change changes csghub-casdoor-migrate's) is rejected and strands the release. The
# upgrade creates them again. Returns 1 when a Job kept running (it is left alone).
delete_finished_jobs() {
    local deadline=$((SECONDS + ${1:-600})) facts job state running="" record
    while :; do
        facts=$(_gate_release_jobs 2>/dev/null | job_facts || true) # the API failing: no job known
        running=$(awk '$3 == "running" { print $2; exit }' <<<"$facts")
        [[ -z "$running" ]] && break
        ((SECONDS >= deadline)) && break
        sleep "${GATE_POLL_SECONDS:-10}"
    done
    while read -r _ job state; do
        [[ -n "$job" && "$state" != running ]] || continue
        _gate_kc -n "${job%%/*}" delete job "${job#*/}" --ignore-not-found >/dev/null
        echo "changed: deleted finished job $job (the upgrade runs it again)"
    done <<<"$facts"
    # The Jobs run again afresh: the gate forgets which of them it saw failed.
    record=$(gate_failed_jobs_file)
    rm -f "$record"
    if [[ -n "$running" ]]; then
        echo "error: job $running of the release is still running; an upgrade now would be rejected" >&2
        return 1
    fi
    return 0
}

# wait_helm_upgrade SINCE TIMEOUT: wait until the helm-controller's Job has applied the release
# after SINCE (epoch seconds): 0 when it succeeded, 1 (with the reason on stderr) when it failed
# or TIMEOUT seconds passed.
wait_helm_upgrade() {
    local since=$1 deadline=$((SECONDS + $2)) job job_state succeeded done_at done_epoch fact hint
    while :; do
        job=$(_gate_kc -n "$GATE_HELMCHART_NS" get helmchart "$GATE_RELEASE" -o 'jsonpath={.status.jobName}' 2>/dev/null || true)
        if [[ -n "$job" ]]; then
            job_state=$(_gate_kc -n "$GATE_HELMCHART_NS" get job "$job" \
                -o 'jsonpath={.status.succeeded} {.status.completionTime}{"\n"}' 2>/dev/null || echo "0 -")
            read -r succeeded done_at <<<"$job_state"
            done_epoch=0
            if [[ "${succeeded:-0}" -ge 1 && -n "$done_at" && "$done_at" != - ]] 2>/dev/null; then
                done_epoch=$(date -d "$done_at" +%s)
            fi
            if ((done_epoch > 0 && done_epoch >= since - 5)); then
                echo "ok: Helm release $GATE_RELEASE_NS/$GATE_RELEASE upgraded (job $GATE_HELMCHART_NS/$job)"
                return 0
            fi
        fi
        fact=$(gate_release_fact)
        hint=$(gate_hint release)
        if [[ "$fact" == "release failed"* ]]; then
            echo "error: the upgrade of the Helm release failed (${fact#release failed }); logs: $hint" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "error: the Helm release was not upgraded within $2 s; logs: $hint" >&2
            return 1
        fi
        sleep "${GATE_POLL_SECONDS:-10}"
    done
}

# restart_coredns DOMAIN TIMEOUT: once the deploy controller has applied coredns-custom for
# DOMAIN, restart CoreDNS (it reads the imported server blocks only at start).
restart_coredns() {
    local deadline=$((SECONDS + $2)) server
    # The server block names the domain as a regular expression (dots escaped); the raw value of
    # the key shows it as written.
    while :; do
        server=$(_gate_kc -n kube-system get configmap coredns-custom -o 'jsonpath={.data.csghub\.server}' 2>/dev/null || true)
        if grep -qF "${1//./\\.}" <<<"$server"; then
            break
        fi
        if ((SECONDS >= deadline)); then
            echo "error: ConfigMap kube-system/coredns-custom does not name $1 after $2 s (journalctl -u k3s)" >&2
            return 1
        fi
        sleep 2
    done
    _gate_kc -n kube-system rollout restart deployment/coredns >/dev/null
    if ! _gate_kc -n kube-system rollout status deployment/coredns --timeout="${2}s" >/dev/null; then
        echo "error: CoreDNS did not come back after the restart (sudo k3s kubectl -n kube-system get pods)" >&2
        return 1
    fi
    echo "changed: restarted CoreDNS to load the names of $1"
}

# coredns_stale CUSTOM_CREATED < "POD START" lines -> the pods that started before the
# coredns-custom ConfigMap existed (RFC 3339 UTC times compare as text). CoreDNS reads the
# imported server blocks only at start: such a pod does not answer CSGHub's names.
coredns_stale() {
    awk -v made="$1" 'NF >= 2 && $2 < made { print $1 }'
}

# coredns_follow_custom: at every boot, once the API answers: restart CoreDNS when one of its pods
# started before coredns-custom was created (k3s applies its auto-deploy folder in name order, and
# a failed or late apply would leave CoreDNS without CSGHub's names until the next restart). A
# change of coredns-custom later is csghub-reconfigure's (restart_coredns). Prints changed:/ok:.
coredns_follow_custom() {
    local made pods stale
    made=$(_gate_kc -n kube-system get configmap coredns-custom -o 'jsonpath={.metadata.creationTimestamp}' 2>/dev/null) || made=""
    if [[ -z "$made" ]]; then
        echo "ok: no coredns-custom ConfigMap (yet); nothing for CoreDNS to load"
        return 0
    fi
    pods=$(_gate_kc -n kube-system get pods -l k8s-app=kube-dns \
        -o 'jsonpath={range .items[*]}{.metadata.name} {.status.startTime}{"\n"}{end}' 2>/dev/null) || pods=""
    stale=$(coredns_stale "$made" <<<"$pods")
    if [[ -z "$stale" ]]; then
        echo "ok: CoreDNS started after coredns-custom existed"
        return 0
    fi
    _gate_kc -n kube-system rollout restart deployment/coredns >/dev/null || return 1
    echo "changed: restarted CoreDNS (${stale//$'\n'/ } started before coredns-custom existed)"
}

# retry_release: what `csghub-status --retry` does after a failure. Forget a failed Helm
# revision (with failurePolicy abort the helm-controller waits for that), delete the release's
# finished Jobs (so failed ones run again), and run the helm-controller's Job again.
retry_release() {
    local job failed_revisions now
    failed_revisions=$(_gate_kc -n "$GATE_RELEASE_NS" get secrets -l "owner=helm,name=$GATE_RELEASE,status=failed" -o name 2>/dev/null || true)
    if [[ -n "$failed_revisions" ]]; then
        _gate_kc -n "$GATE_RELEASE_NS" delete secrets -l "owner=helm,name=$GATE_RELEASE,status=failed" >/dev/null
        echo "changed: forgot the failed Helm revision of $GATE_RELEASE_NS/$GATE_RELEASE (the next run installs or upgrades again)"
    fi
    delete_finished_jobs 0 2>/dev/null || echo "ok: a job of the release is still running; it is left to finish"
    job=$(_gate_kc -n "$GATE_HELMCHART_NS" get helmchart "$GATE_RELEASE" -o 'jsonpath={.status.jobName}' 2>/dev/null || true)
    if [[ -n "$job" ]]; then
        _gate_kc -n "$GATE_HELMCHART_NS" delete job "$job" --ignore-not-found >/dev/null
    fi
    # Any change of the HelmChart makes the helm-controller apply it again (and recreate its Job).
    now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    _gate_kc -n "$GATE_HELMCHART_NS" annotate --overwrite helmchart "$GATE_RELEASE" \
        "csghub-appliance/retried-at=$now" >/dev/null
    echo "changed: the helm-controller applies the release $GATE_RELEASE_NS/$GATE_RELEASE again"
}
