# shellcheck shell=bash
# Functions shared by csghub-firstboot, csghub-status, csghub-banner and csghub-reconfigure.
# Installed as /usr/local/lib/csghub-appliance/lib.sh. Sourced, never executed.
#
# The pure functions (no side effects, inputs as arguments or stdin) carry the decisions:
# which access mode and address, which domain, what the banner says. The unit tests run
# them on the build host with canned inputs (tests/unit/test_firstboot.py).

# install_if_changed, die, KC (provision/files/common/lib.sh), installed by 40-firstboot.sh
# beside this file; from the source tree (the unit tests) the one in provision/files/common.
if [[ -z "${CSGHUB_COMMON_LIB:-}" ]]; then
    CSGHUB_COMMON_LIB=/usr/local/lib/csghub-appliance/common.sh
    [[ -r "$CSGHUB_COMMON_LIB" ]] || CSGHUB_COMMON_LIB="${BASH_SOURCE[0]%/*}/../common/lib.sh"
fi
# shellcheck source-path=SCRIPTDIR source=../common/lib.sh
. "$CSGHUB_COMMON_LIB"

CSGHUB_ETC=${CSGHUB_ETC:-/etc/csghub-appliance}
CSGHUB_STATE=${CSGHUB_STATE:-/var/lib/csghub-appliance}
CSGHUB_LOGIN_USER=${CSGHUB_LOGIN_USER:-csghub}
# The readiness gate's functions (provision/files/common/readiness.sh) and its latest status line
# (written by csghub-ready; /run: a reboot starts over with "starting").
CSGHUB_READINESS_LIB=${CSGHUB_READINESS_LIB:-/usr/local/lib/csghub-appliance/readiness.sh}
CSGHUB_READINESS=${CSGHUB_READINESS:-/run/csghub-appliance/readiness}
# The default domain needs no DNS: browsers resolve *.localhost to the host's loopback,
# where the VirtualBox NAT forwards listen.
CSGHUB_DEFAULT_DOMAIN=csghub.localhost

# Build-time facts written by 40-firstboot.sh (product, version, ports, k3s node address).
load_appliance_env() {
    if [[ -r "$CSGHUB_ETC/appliance.env" ]]; then
        # shellcheck source=/dev/null
        . "$CSGHUB_ETC/appliance.env"
    fi
    APPLIANCE_PRODUCT=${APPLIANCE_PRODUCT:-CSGHub appliance}
    APPLIANCE_VERSION=${APPLIANCE_VERSION:-unknown}
    CSGHUB_HTTP_PORT=${CSGHUB_HTTP_PORT:-30080}
    CSGHUB_DOMAIN=${CSGHUB_DOMAIN:-$CSGHUB_DEFAULT_DOMAIN}
    CSGHUB_NAMESPACE=${CSGHUB_NAMESPACE:-csghub}
    K3S_NODE_IP=${K3S_NODE_IP:-}
}

# The owner's choice (csghub-reconfigure writes it): ACCESS_MODE=auto|nat|address, ACCESS_ADDRESS=IP.
# shellcheck disable=SC2034  # read by the callers
load_access_conf() {
    ACCESS_MODE=auto
    ACCESS_ADDRESS=
    if [[ -r "$CSGHUB_ETC/access.conf" ]]; then
        # shellcheck source=/dev/null
        . "$CSGHUB_ETC/access.conf"
    fi
}

stack_installed() {
    [[ -x /usr/local/bin/k3s ]]
}

# detect_access NODE_IP < `ip -o -4 addr show` output
# Prints "MODE ADDRESS": "nat 10.0.2.15" when a VirtualBox/QEMU user-mode NAT address is
# present (the host reaches the guest through port forwards on 127.0.0.1), else
# "address IP" for the first other global IPv4 address (host-only or bridged adapter,
# reachable from the host directly), else "none -". Interfaces the cluster owns (the k3s
# node address, CNI bridges, veths, flannel) are never candidates.
detect_access() {
    local node_ip=${1:-} nat="" other="" _n ifname family cidr addr
    while read -r _n ifname family cidr _; do
        [[ "$family" == inet ]] || continue
        addr=${cidr%%/*}
        case "$ifname" in
            lo | cni* | flannel* | veth* | docker* | kube* | cali* | tunl* | dummy*) continue ;;
            *) ;;
        esac
        [[ -n "$node_ip" && "$addr" == "$node_ip" ]] && continue
        case "$addr" in
            127.* | 169.254.*) continue ;;
            10.0.2.*) [[ -z "$nat" ]] && nat=$addr ;;
            *) [[ -z "$other" ]] && other=$addr ;;
        esac
    done
    if [[ -n "$nat" ]]; then
        echo "nat $nat"
    elif [[ -n "$other" ]]; then
        echo "address $other"
    else
        echo "none -"
    fi
}

# choose_access CONF_MODE CONF_ADDRESS DETECTED_MODE DETECTED_ADDRESS -> "MODE ADDRESS"
# The owner's pinned choice wins over detection; "auto" follows detection.
choose_access() {
    local conf_mode=$1 conf_addr=$2 det_mode=$3 det_addr=$4
    case "$conf_mode" in
        nat) echo "nat ${det_addr/#-/10.0.2.15}" ;;
        address)
            if [[ -n "$conf_addr" ]]; then
                echo "address $conf_addr"
            else
                echo "$det_mode $det_addr"
            fi
            ;;
        *) echo "$det_mode $det_addr" ;;
    esac
}

# domain_for MODE ADDRESS CONFIGURED_DOMAIN -> domain
# A domain chosen at build time (anything but the default) is the owner's DNS name and is
# kept whatever the network. Otherwise NAT (and no network) -> csghub.localhost; a direct
# address -> csghub.<IP>.nip.io (resolves to IP with public DNS; the chart derives
# casdoor.<IP>.nip.io etc. from it).
domain_for() {
    local mode=$1 address=$2 configured=${3:-$CSGHUB_DEFAULT_DOMAIN}
    if [[ "$configured" != "$CSGHUB_DEFAULT_DOMAIN" ]]; then
        echo "$configured"
    elif [[ "$mode" == address && "$address" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
        echo "csghub.$address.nip.io"
    else
        echo "$CSGHUB_DEFAULT_DOMAIN"
    fi
}

# url_for DOMAIN PORT
url_for() {
    echo "http://$1:$2"
}

# new_password: 20 characters in 4 groups, from an alphabet without look-alikes
# (no 0/O, 1/l/I); about 100 bits. Read from the kernel CSPRNG.
new_password() {
    local alphabet=abcdefghijkmnpqrstuvwxyz23456789 raw out="" i
    raw=$(od -An -N20 -tu1 /dev/urandom)
    i=0
    for b in $raw; do
        out+=${alphabet:$((b % 32)):1}
        i=$((i + 1))
        ((i % 5 == 0 && i < 20)) && out+=-
    done
    echo "$out"
}

# new_token: 32 random bytes, hex (k3s cluster token).
new_token() {
    local hex
    hex=$(od -An -N32 -tx1 /dev/urandom)
    echo "${hex//[[:space:]]/}"
}

# status_line STACK GATE_LINE: the state line of the banner. GATE_LINE is the readiness gate's
# latest line ("ready", "starting (k/N): ...", "failed: ... — what to run"; empty before the
# gate has run).
status_line() {
    local stack=$1 gate=${2:-}
    if [[ "$stack" != installed ]]; then
        echo "CSGHub stack not installed in this image (built with the k3s/csghub steps skipped)."
    else
        echo "CSGHub: ${gate:-starting (0/?): waiting for the cluster}"
    fi
}

# render_banner: the text of /etc/issue, /etc/motd and `csghub-status`, from variables:
# PRODUCT VERSION STATUS MODE ADDRESS URL STACK ADMIN_USER LOGIN_USER LOGIN_PASSWORD
# (LOGIN_PASSWORD empty: the owner changed it, or the reader may not see it).
render_banner() {
    echo "$PRODUCT $VERSION"
    echo
    echo "  $STATUS"
    echo
    if [[ "$STACK" == installed ]]; then
        case "$MODE" in
            nat)
                echo "  Open from the host:   $URL"
                echo "  (VirtualBox NAT: the VM forwards host port ${URL##*:} on 127.0.0.1; *.localhost needs no DNS)"
                ;;
            address)
                echo "  Open from the host:   $URL"
                echo "  (VM address $ADDRESS; run 'sudo csghub-reconfigure' after changing network adapters)"
                ;;
            *)
                echo "  No network address yet: attach a NAT, host-only or bridged adapter,"
                echo "  then run 'sudo csghub-reconfigure'."
                ;;
        esac
        echo "  CSGHub admin user:    $ADMIN_USER"
        echo "  Admin password:       sudo csghub-status --admin-password"
        echo
    else
        # Still say what the network detection found: the address CSGHub would have here.
        case "$MODE" in
            nat | address) echo "  Network: $MODE, VM address $ADDRESS; CSGHub's URL here would be $URL" ;;
            *) echo "  Network: no address yet" ;;
        esac
        echo
    fi
    echo "  Log in to this VM:    user $LOGIN_USER (console, or SSH where a port reaches guest port 22)"
    if [[ -n "$LOGIN_PASSWORD" ]]; then
        echo "  One-time password:    $LOGIN_PASSWORD"
        echo "  (made for this copy at first boot; shown until you change it with 'passwd')"
    else
        echo "  Password:             the one you set (first-boot password: sudo csghub-status)"
    fi
}

# issue_escape: agetty interprets backslash escapes in /etc/issue; keep text literal.
issue_escape() {
    sed 's/\\/\\\\/g'
}

# to_serial LINE: one line for whoever reads the first serial port (a verifier's log file).
# Best effort: a VM without a serial port, or with nothing attached, must not hold us up.
to_serial() {
    local port=${CSGHUB_SERIAL:-/dev/ttyS0}
    [[ -c "$port" ]] || return 0
    # shellcheck disable=SC2016  # expanded by the inner shell
    timeout 3 bash -c 'printf "%s\n" "$1" >"$2"' _ "$1" "$port" 2>/dev/null || true
}

# login_password_current: the first-boot password, if the owner has not changed it yet
# (root only: reads /etc/shadow and the state file). Prints nothing otherwise.
login_password_current() {
    local pw_file="$CSGHUB_STATE/login-password" hash_file="$CSGHUB_STATE/login-password.hash" entry now made
    [[ -r "$pw_file" && -r "$hash_file" && -r /etc/shadow ]] || return 0
    entry=$(getent shadow "$CSGHUB_LOGIN_USER") || return 0 # no such user: no password to show
    now=$(cut -d: -f2 <<<"$entry")
    made=$(cat "$hash_file")
    if [[ -n "$now" && "$now" == "$made" ]]; then
        cat "$pw_file"
    fi
}

# gather_banner: fill the render_banner variables from this machine.
gather_banner() {
    load_appliance_env
    PRODUCT=$APPLIANCE_PRODUCT
    VERSION=$APPLIANCE_VERSION
    LOGIN_USER=$CSGHUB_LOGIN_USER
    ADMIN_USER=root
    MODE=none ADDRESS=- DOMAIN=$CSGHUB_DOMAIN
    if [[ -r "$CSGHUB_STATE/access.env" ]]; then
        # shellcheck source=/dev/null
        . "$CSGHUB_STATE/access.env"
    fi
    URL=$(url_for "$DOMAIN" "$CSGHUB_HTTP_PORT")
    LOGIN_PASSWORD=$(login_password_current)
    local gate=""
    if stack_installed; then
        STACK=installed
        [[ -r "$CSGHUB_READINESS" ]] && gate=$(head -n1 "$CSGHUB_READINESS")
    else
        STACK=absent
    fi
    STATUS=$(status_line "$STACK" "$gate")
}

# --- side effects shared by csghub-firstboot and csghub-reconfigure ------------------------

K3S_MANIFESTS=${K3S_MANIFESTS:-/var/lib/rancher/k3s/server/manifests}
K3S_REGISTRIES=${K3S_REGISTRIES:-/etc/rancher/k3s/registries.yaml}
INSTANCE_MANIFEST_NAME=csghub-appliance-instance.yaml
# The HelmChart that installs CSGHub: 30-csghub.sh keeps it here, 90-seal.sh takes it out of the
# auto-deploy folder, and ensure_release hands it back to k3s only once this copy's objects exist.
CSGHUB_HELMCHART_KEPT=${CSGHUB_HELMCHART_KEPT:-/usr/local/share/csghub-appliance/csghub-helmchart.yaml}
HELMCHART_MANIFEST_NAME=csghub.yaml
# This copy's objects the chart looks up (secrets.sh writes them, ensure_release creates them).
CSGHUB_SECRETS_DIR=${CSGHUB_SECRETS_DIR:-$CSGHUB_STATE/secrets}
PRECREATED_NAME=precreated.yaml
# Prints each object's kind, name and data the same way for the file and for the cluster.
# (kubectl prints a List for `get -f` and one object at a time for `create --dry-run`.)
# shellcheck disable=SC2016  # a Go template for kubectl, not for the shell
PRECREATED_VIEW='{{define "o"}}{{.kind}}/{{.metadata.namespace}}/{{.metadata.name}}{{range $k, $v := .data}} {{$k}}={{printf "%q" $v}}{{end}}{{"\n"}}{{end}}{{if .items}}{{range .items}}{{template "o" .}}{{end}}{{else}}{{template "o" .}}{{end}}'
# The csghub step's guest library: coredns_custom_manifest and chart_base, the same rules as
# appliance/manifests.py (tests/unit/test_manifests_scripts.py holds them equal).
CSGHUB_STACK_LIB=${CSGHUB_STACK_LIB:-/usr/local/lib/csghub-appliance/csghub.sh}

# wait_for_address SECONDS: DHCP may still be running when first boot starts.
wait_for_address() {
    local deadline=$((SECONDS + $1)) found addresses
    while :; do
        addresses=$(ip -o -4 addr show scope global)
        found=$(detect_access "$K3S_NODE_IP" <<<"$addresses")
        [[ "$found" != "none -" ]] && break
        ((SECONDS >= deadline)) && break
        sleep 2
    done
    echo "$found"
}

# instance_manifest DOMAIN: the per-copy Helm values. A HelmChartConfig is merged by k3s's
# helm-controller over the HelmChart that 30-csghub.sh installed, so the build's chart
# manifest stays untouched and only what belongs to this copy lives here: its domain and the
# credentials the chart reads from values.
instance_manifest() {
    cat <<YAML
# Written by csghub-firstboot / csghub-reconfigure for this copy. Do not edit: run
# 'sudo csghub-reconfigure' to change the access mode or address.
apiVersion: helm.cattle.io/v1
kind: HelmChartConfig
metadata:
  name: ${CSGHUB_HELMCHART_NAME:-csghub}
  namespace: ${CSGHUB_HELMCHART_NAMESPACE:-kube-system}
spec:
  valuesContent: |-
    global:
      gateway:
        external:
          domain: "$1"
YAML
    # This copy's credentials that the chart takes as values (made by secrets.sh at first boot).
    if [[ -r "${CSGHUB_SECRETS_DIR:-$CSGHUB_STATE/secrets}/helm-values.yaml" ]]; then
        sed 's/^/    /' "${CSGHUB_SECRETS_DIR:-$CSGHUB_STATE/secrets}/helm-values.yaml"
    fi
}

# ensure_release: with k3s up, create this copy's objects the chart looks up (secrets.sh wrote
# them to $PRECREATED_NAME) where they are missing, read them back, and only then put the
# HelmChart into k3s's auto-deploy folder, so the release never installs without them (it
# would take the chart's clock-derived credentials). An object that exists is never replaced:
# Helm owns it once the release is installed. They are created once, not auto-deployed: k3s's
# deploy controller re-applies that folder at every start and would reset what Helm rendered.
# Returns 1, saying why, when it could not; a rerun picks up where it stopped.
ensure_release() {
    local precreated="$CSGHUB_SECRETS_DIR/$PRECREATED_NAME" dest="$K3S_MANIFESTS/$HELMCHART_MANIFEST_NAME" \
        out errors wanted live
    if [[ ! -r "$CSGHUB_HELMCHART_KEPT" ]]; then
        echo "ok: no kept HelmChart ($CSGHUB_HELMCHART_KEPT); nothing to install"
        return 0
    fi
    if [[ -f "$dest" ]] && cmp -s "$CSGHUB_HELMCHART_KEPT" "$dest"; then
        echo "ok: the HelmChart is in k3s's auto-deploy folder"
        return 0
    fi
    if [[ ! -s "$precreated" ]]; then
        echo "error: $precreated is missing: first boot has not made this copy's credentials (sudo systemctl status csghub-firstboot)" >&2
        return 1
    fi
    # Missing objects are created; "already exists" is what a rerun sees, anything else is a failure.
    if ! out=$("${KC[@]}" --request-timeout=30s create -f "$precreated" 2>&1); then
        errors=$(grep -v -e '^[a-z0-9./-]* created$' -e '(AlreadyExists)' <<<"$out" || true)
        if [[ -n "$errors" ]]; then
            echo "error: creating this copy's objects failed: ${errors//$'\n'/; }" >&2
            return 1
        fi
    fi
    # Read back: the cluster must hold exactly what the file says, key by key.
    wanted=$("${KC[@]}" create --dry-run=client -f "$precreated" -o "go-template=$PRECREATED_VIEW" 2>&1) || {
        echo "error: cannot read $precreated: $wanted" >&2
        return 1
    }
    live=$("${KC[@]}" --request-timeout=30s get -f "$precreated" -o "go-template=$PRECREATED_VIEW" 2>&1) || {
        echo "error: cannot read this copy's objects back: $live" >&2
        return 1
    }
    # One line per object (values quoted): compared as sets of lines.
    wanted=$(sort <<<"$wanted")
    live=$(sort <<<"$live")
    if [[ "$wanted" != "$live" ]]; then
        echo "error: the cluster's objects differ from this copy's credentials ($precreated); delete them and run sudo csghub-status --retry" >&2
        return 1
    fi
    echo "ok: this copy's objects the chart looks up are in the cluster (read back)"
    install_if_changed -q "$CSGHUB_HELMCHART_KEPT" "$dest" 0600 || return 1
    echo "changed: handed the HelmChart to k3s ($dest): helm-controller installs CSGHub with this copy's credentials"
}

# retarget_knative_registries OLD_DOMAIN DOMAIN: the release's KnativeServing names the registry
# host Knative must not resolve tags on (CSGHub's own, plain HTTP). Chart 2.4.0 creates it as a
# post-install hook; helm 3.17's first upgrade adopts it with the new render as its "original"
# (pkg/action/upgrade.go, existingResourceConflict) and a custom resource is patched two-way from
# that original: the patch is empty and the object keeps the old host. Set it here (the release
# test, tests/unit/test_release_install.py, fails without it); later upgrades patch it from the
# previous release's manifest, which then holds it.
retarget_knative_registries() {
    local old=$1 new=$2 skip patch
    skip=$(k3s kubectl --request-timeout=20s -n knative-serving get knativeservings.operator.knative.dev knative-serving \
        -o 'jsonpath={.spec.config.deployment.registries-skipping-tag-resolving}' 2>/dev/null) || skip=""
    [[ -n "$skip" && ",$skip," == *",$old,"* || ",$skip," == *",$old:"* ]] || return 0
    skip=${skip//"$old"/"$new"}
    patch=$(printf '{"spec":{"config":{"deployment":{"registries-skipping-tag-resolving":"%s"}}}}' "$skip")
    k3s kubectl --request-timeout=20s -n knative-serving patch knativeservings.operator.knative.dev knative-serving \
        --type merge -p "$patch" >/dev/null || return 1
    echo "changed: Knative skips tag resolution for $new (KnativeServing knative-serving)"
}

# apply_access MODE ADDRESS: record the access mode, and make everything the domain touches
# follow it. Prints "changed:"/"ok:" lines. With k3s running (csghub-reconfigure) a domain
# change is carried through the release without stranding it: the release's finished Jobs are
# deleted first (their pod templates are immutable, and the new domain changes them), CoreDNS
# is restarted when its names change, registries.yaml follows (k3s restarted only when it
# changed), and the Helm upgrade must succeed. Returns 1, saying why, when it did not; a rerun
# picks up where it stopped. Each command's failure is checked here (`|| return 1`): the caller
# may run it in an `if`, where set -e is off. At first boot k3s is not running yet: only files are written,
# and csghub-ready finishes the job once the cluster is up.
apply_access() {
    local mode=$1 address=$2 domain old_domain="" live=no values_changed=no dns_changed=no since dns_manifest values renamed
    domain=$(domain_for "$mode" "$address" "$CSGHUB_DOMAIN")
    if [[ -r "$CSGHUB_STATE/access.env" ]]; then
        old_domain=$(sed -n 's/^DOMAIN=//p' "$CSGHUB_STATE/access.env")
    fi
    [[ -n "$old_domain" ]] || old_domain=$CSGHUB_DOMAIN
    # Everything below is written by content (install_if_changed), and access.env, which names
    # the previous domain, only at the end: a run cut short is finished by the next one.
    if stack_installed; then
        if systemctl -q is-active k3s.service && declare -F delete_finished_jobs >/dev/null; then
            live=yes
        fi
        if [[ "$old_domain" != "$domain" && "$live" == yes ]]; then
            # The chart creates this Secret only when absent: delete it before the values change,
            # so the release upgrade that follows writes it again with the new registry host.
            if k3s kubectl --request-timeout=20s -n spaces get secret csghub-docker-credential >/dev/null 2>&1; then
                k3s kubectl --request-timeout=20s -n spaces delete secret csghub-docker-credential >/dev/null || return 1
                echo "changed: deleted Secret spaces/csghub-docker-credential (the chart recreates it for $domain)"
            fi
            delete_finished_jobs "${CSGHUB_JOB_WAIT_SECONDS:-600}" || return 1
            retarget_knative_registries "$old_domain" "$domain" || return 1
        fi
        mkdir -p "$K3S_MANIFESTS" || return 1
        since=$(date +%s)
        values=$(instance_manifest "$domain") || return 1
        install_if_changed -q - "$K3S_MANIFESTS/$INSTANCE_MANIFEST_NAME" 0600 <<<"$values" || return 1
        if [[ "$FILE_CHANGED" == yes ]]; then
            values_changed=yes
            echo "changed: Helm values for this copy: domain $domain ($K3S_MANIFESTS/$INSTANCE_MANIFEST_NAME)"
        else
            echo "ok: Helm values already name domain $domain"
        fi
        # In-cluster DNS for the external names (installed by the csghub step, not by the chart).
        if [[ -f "$K3S_MANIFESTS/coredns-custom.yaml" && -n "$K3S_NODE_IP" && -r "$CSGHUB_STACK_LIB" ]]; then
            dns_manifest=$(
                # shellcheck source=/dev/null
                . "$CSGHUB_STACK_LIB" && base=$(chart_base "$domain") &&
                    coredns_custom_manifest "$domain" "$base" "$K3S_NODE_IP"
            ) || return 1
            install_if_changed -q - "$K3S_MANIFESTS/coredns-custom.yaml" 0600 <<<"$dns_manifest" || return 1
            if [[ "$FILE_CHANGED" == yes ]]; then
                dns_changed=yes
                echo "changed: in-cluster DNS answers for $domain (coredns-custom.yaml)"
            else
                echo "ok: in-cluster DNS already answers for $domain"
            fi
        else
            echo "ok: no coredns-custom manifest in this image; nothing to point at $domain"
        fi
        if [[ "$live" == yes ]]; then
            if [[ "$dns_changed" == yes ]]; then
                restart_coredns "$domain" 300 || return 1
            fi
            # A copy whose release was never handed to k3s gets it now, after its objects.
            ensure_release || return 1
            # registries.yaml is read by k3s only at start and is not part of the chart.
            sync_registries "$domain" || true
            if [[ "$values_changed" == yes || "$old_domain" != "$domain" ]]; then
                wait_helm_upgrade "$since" "${CSGHUB_UPGRADE_TIMEOUT:-1800}" || return 1
            fi
        elif [[ "$old_domain" != "$domain" && -f "$K3S_REGISTRIES" ]] && grep -qF "$old_domain" "$K3S_REGISTRIES"; then
            # k3s not running: rename the host now; csghub-ready checks the credentials later.
            renamed=$(sed "s/${old_domain//./\\.}/$domain/g" "$K3S_REGISTRIES") || return 1
            install_if_changed -q - "$K3S_REGISTRIES" 0600 <<<"$renamed" || return 1
            echo "changed: $K3S_REGISTRIES now names $domain instead of $old_domain"
        fi
    else
        echo "ok: CSGHub stack not installed; no Helm values, DNS or registry entries to update"
    fi
    printf 'MODE=%s\nADDRESS=%s\nDOMAIN=%s\n' "$mode" "$address" "$domain" |
        install_if_changed -q - "$CSGHUB_STATE/access.env" 0644 || return 1
    if [[ "$FILE_CHANGED" == yes ]]; then
        echo "changed: access mode $mode, address $address, domain $domain"
    else
        echo "ok: access mode $mode, address $address, domain $domain (unchanged)"
    fi
}

# boot_nonce: the nonce a verifier gave this boot (SMBIOS OEM string
# "csghub-appliance-boot-nonce=<32 hex digits>", QEMU -smbios type=11,...), else "none".
boot_nonce() {
    local dir=${CSGHUB_DMI_ENTRIES:-/sys/firmware/dmi/entries} raw strings line
    for raw in "$dir"/11-*/raw; do
        [[ -r "$raw" ]] || continue
        # The entry's strings are NUL-terminated: one per line; only a whole 32-hex nonce at a string's end counts.
        strings=$(LC_ALL=C tr '\0' '\n' <"$raw") || continue
        while IFS= read -r line; do
            if [[ "$line" =~ csghub-appliance-boot-nonce=([0-9a-f]{32})$ ]]; then
                echo "${BASH_REMATCH[1]}"
                return 0
            fi
        done <<<"$strings"
    done
    echo none
}

# first_boot_nonce: the nonce of the boot that started this copy's first boot, as
# csghub-firstboot recorded it ("none": no verifier gave one; "unknown": not recorded).
# The banner prints it on the CSGHUB-APPLIANCE-LOGIN line: the verifier's first-boot proof.
first_boot_nonce() {
    local value=""
    [[ -r "$CSGHUB_STATE/firstboot.nonce" ]] && value=$(head -c 64 "$CSGHUB_STATE/firstboot.nonce")
    if [[ "$value" =~ ^([0-9a-f]{32}|none)$ ]]; then
        echo "$value"
    else
        echo unknown
    fi
}
