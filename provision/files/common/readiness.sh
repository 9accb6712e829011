# shellcheck shell=bash
# The readiness gate: CSGHub counts as ready only when it works, not when its pods run.
# Used by the build (provision/30-csghub.sh) and by every copy at every boot (csghub-ready),
# so both prove the same thing:
#   - the Helm release is deployed, and every Job of the release has completed
#     (csghub-server-migrate, csghub-casdoor-migrate, csghub-minio-init, the hook Jobs);
#   - every Deployment, StatefulSet and DaemonSet is ready (user spaces excepted);
#   - the portal answers through the gateway with the appliance's Host;
#   - an admin login through Casdoor's API (/api/login) succeeds with this copy's credentials
#     (Secret csghub-casdoor-init);
#   - the git SSH port answers with an SSH banner;
#   - the registry answers /v2/ (401 with a Basic challenge, or 200).
# It also points k3s's containerd at CSGHub's own registry (registries.yaml with this copy's
# credentials, read from Secret csghub-registry), so spaces CSGHub builds can start.
#
# Sourced, never executed. Needs bash, curl and `k3s kubectl` only (no Python on the guest).
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

# workload_facts USER_NAMESPACES < "KIND NS/NAME WANTED READY" lines
#   -> "workload KIND NS/NAME ready|waiting" lines. An empty WANTED counts as 1 (a Deployment
#   without .spec.replicas), an empty READY as 0; workloads in USER_NAMESPACES are left out.
workload_facts() {
    awk -v skip=" $1 " 'NF >= 2 { split($2, p, "/"); if (index(skip, " " p[1] " ")) next
                  want = ($3 == "" ? 1 : $3); have = ($4 == "" ? 0 : $4)
                  print "workload", $1, $2, ((have + 0 >= want + 0) ? "ready" : "waiting") }'
}

# pull_facts USER_NAMESPACES < "NS/POD IMAGE=REASON ..." lines (one per pod, one word per
#   container) -> "pull NS/POD IMAGE REASON" for each container that cannot get its image.
pull_facts() {
    awk -v skip=" $1 " '{ split($1, p, "/"); if (index(skip, " " p[1] " ")) next
        for (i = 2; i <= NF; i++) { n = split($i, w, "="); reason = w[n]
            if (reason ~ /^(ErrImagePull|ImagePullBackOff|ErrImageNeverPull|InvalidImageName)$/) {
                image = substr($i, 1, length($i) - length(reason) - 1); print "pull", $1, image, reason } } }'
}

# login_outcome < Casdoor's /api/login answer (JSON) -> "ok" | "refused MESSAGE"
login_outcome() {
    local body msg
    body=$(cat)
    if [[ "$body" =~ \"status\"[[:space:]]*:[[:space:]]*\"ok\" ]]; then
        echo ok
        return 0
    fi
    msg=$(sed -n 's/.*"msg"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' <<<"$body")
    msg=${msg%%$'\n'*}
    echo "refused ${msg:-no answer Casdoor understands}"
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

# casdoor_login_body USER PASSWORD -> the JSON Casdoor's /api/login takes for a password login
# to CSGHub's application (organization OpenCSG, application CSGHub, as chart 2.4.0 seeds them).
casdoor_login_body() {
    local user pass
    user=$(json_string "$1") && pass=$(json_string "$2") || return 1
    printf '{"type":"login","organization":"%s","application":"%s","username":%s,"password":%s,"autoSignin":false}\n' \
        "$GATE_CASDOOR_ORG" "$GATE_CASDOOR_APP" "$user" "$pass"
}

# registry_ok CODE CHALLENGE: the registry's /v2/ answer counts when it asks for credentials
# with a Basic challenge (401) or lets us in (200).
registry_ok() {
    [[ "$1" == 200 || ("$1" == 401 && "$2" == Basic*) ]]
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
#   portal CODE                    HTTP status of / through the gateway (000: no answer)
#   login ok|refused MSG|down      the admin login through Casdoor's API
#   gitssh BANNER|-                first line the git SSH port sent
#   registry CODE CHALLENGE        /v2/ status and WWW-Authenticate scheme (- when none)
#   offline yes                    no internet: a missing image is final
#   expired yes                    the deadline passed: what is still pending has failed
gate_verdict() {
    local kind a b c rest total=0 done_count=0 pending="" pending_check="" pending_subject=""
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
            portal)
                total=$((total + 1))
                if [[ "$a" =~ ^[23][0-9][0-9]$ ]]; then
                    done_count=$((done_count + 1))
                else
                    _gate_pend portal "" "the portal through the gateway (HTTP ${a:-000})"
                fi
                ;;
            login)
                total=$((total + 1))
                case "$a" in
                    ok) done_count=$((done_count + 1)) ;;
                    refused) _gate_fail login "" "the admin login through Casdoor was refused (${line#login refused })" ;;
                    *) _gate_pend login "" "the admin login through Casdoor" ;;
                esac
                ;;
            gitssh)
                total=$((total + 1))
                if [[ "$a" == SSH-* ]]; then
                    done_count=$((done_count + 1))
                else
                    _gate_pend gitssh "" "git over SSH (no SSH banner)"
                fi
                ;;
            registry)
                total=$((total + 1))
                if registry_ok "$a" "$b"; then
                    done_count=$((done_count + 1))
                else
                    _gate_pend registry "" "the registry's /v2/ (HTTP ${a:-000})"
                fi
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

# gate_http_code HOST PATH: the status code for http://HOST:PORT/PATH through the node address,
# with the Host header a browser sends.
gate_http_code() {
    local code
    # curl writes 000 itself when nothing answered (and exits non-zero).
    code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 15 \
        --resolve "$1:$CSGHUB_HTTP_PORT:$K3S_NODE_IP" "http://$1:$CSGHUB_HTTP_PORT$2" 2>/dev/null) || true
    echo "${code:-000}"
}

# gate_registry_fact HOST -> "registry CODE SCHEME"
gate_registry_fact() {
    local headers code scheme
    headers=$(curl -sS -o /dev/null -D - --max-time 15 \
        --resolve "$1:$CSGHUB_HTTP_PORT:$K3S_NODE_IP" "http://$1:$CSGHUB_HTTP_PORT/v2/" 2>/dev/null | tr -d '\r') || true
    code=$(awk 'NR == 1 { print $2 }' <<<"$headers")
    scheme=$(awk 'tolower($1) == "www-authenticate:" { print $2; exit }' <<<"$headers")
    echo "registry ${code:-000} ${scheme:--}"
}

# gate_login_fact CASDOOR_HOST -> "login ok|refused MSG|down"
gate_login_fact() {
    local user pass body answer code outcome
    user=$(gate_secret_value "$GATE_CASDOOR_SECRET" INIT_ADMIN_USER)
    pass=$(gate_secret_value "$GATE_CASDOOR_SECRET" INIT_ADMIN_PASSWORD)
    if [[ -z "$user" || -z "$pass" ]]; then
        echo "login down"
        return 0
    fi
    # The password goes on stdin, never on a command line.
    body=$(casdoor_login_body "$user" "$pass") || {
        echo "login refused the credentials hold a control character"
        return 0
    }
    answer=$(curl -sS --max-time 20 -H 'Content-Type: application/json' \
        --data-binary @- -w '\n%{http_code}' \
        --resolve "$1:$CSGHUB_HTTP_PORT:$K3S_NODE_IP" "http://$1:$CSGHUB_HTTP_PORT/api/login" 2>/dev/null <<<"$body") || answer=$'\n000'
    code=${answer##*$'\n'}
    if [[ "$code" != 200 ]]; then
        echo "login down"
        return 0
    fi
    outcome=$(login_outcome <<<"${answer%$'\n'*}")
    echo "login $outcome"
}

# gate_ssh_banner -> the first line the git SSH port sends, or "-".
gate_ssh_banner() {
    local line
    # shellcheck disable=SC2016  # the inner script expands its own positional parameters
    line=$(timeout 10 bash -c 'exec 3<>"/dev/tcp/$1/$2"; IFS= read -r line <&3; printf "%s" "$line"' \
        _ "$K3S_NODE_IP" "${CSGHUB_GIT_SSH_PORT:-30022}" 2>/dev/null | tr -d '\r') || true
    echo "${line:--}"
}

# gate_casdoor_host: the login service's host name, from its HTTPRoute.
gate_casdoor_host() {
    _gate_kc -n "$GATE_RELEASE_NS" get httproutes -o 'jsonpath={range .items[*]}{range .spec.hostnames[*]}{@}{"\n"}{end}{end}' \
        2>/dev/null | grep -m1 '^casdoor\.' || true
}

# gate_facts DOMAIN: every fact gate_verdict needs, from the live cluster and ports. The admin
# login is tried only once every job and workload is done: Casdoor locks an account after
# repeated failed logins, and a half-started stack would only produce noise.
gate_facts() {
    local domain=$1 release jobs workloads casdoor portal banner
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
    workloads=$({
        _gate_kc get deployments,statefulsets -A \
            -o 'jsonpath={range .items[*]}{.kind} {.metadata.namespace}/{.metadata.name} {.spec.replicas} {.status.readyReplicas}{"\n"}{end}' || true
        _gate_kc get daemonsets -A \
            -o 'jsonpath={range .items[*]}{.kind} {.metadata.namespace}/{.metadata.name} {.status.desiredNumberScheduled} {.status.numberReady}{"\n"}{end}' || true
    } 2>/dev/null | workload_facts "$GATE_USER_NAMESPACES")
    [[ -n "$jobs" ]] && echo "$jobs"
    [[ -n "$workloads" ]] && echo "$workloads"
    _gate_kc get pods -A \
        -o 'jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{range .status.initContainerStatuses[*]} {.image}={.state.waiting.reason}{end}{range .status.containerStatuses[*]} {.image}={.state.waiting.reason}{end}{"\n"}{end}' \
        2>/dev/null | pull_facts "$GATE_USER_NAMESPACES" || true
    portal=$(gate_http_code "$domain" /)
    echo "portal $portal"
    casdoor=$(gate_casdoor_host)
    if [[ -z "$workloads" || -z "$casdoor" ]] || grep -qE '^(job .* (running|failed)|workload .* waiting)$' <<<"$jobs"$'\n'"$workloads"; then
        echo "login down"
    else
        gate_login_fact "$casdoor"
    fi
    banner=$(gate_ssh_banner)
    echo "gitssh $banner"
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
    local domain=$1 timeout=$2 state=$3 offline=${4:-} deadline facts verdict last="" last_print=0 registries=pending rc
    deadline=$((SECONDS + timeout))
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
            ready | failed:*) return 0 ;;
            *) ;; # starting: wait
        esac
        sleep "${GATE_POLL_SECONDS:-10}"
    done
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
    local deadline=$((SECONDS + ${1:-600})) facts job state running=""
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
