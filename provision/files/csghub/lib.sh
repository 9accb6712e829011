# shellcheck shell=bash
# Pure functions of provision/30-csghub.sh (input as arguments or stdin, output on stdout),
# sourced by it and unit-tested on the build host with canned input
# (tests/unit/test_manifests_scripts.py).

# normalize_image REF: the name containerd's CRI stores REF under (docker.ParseDockerRef), the
# same rule as appliance/images.py's normalize_image (tests compare both with a real containerd):
# busybox -> docker.io/library/busybox:latest, docker.io/redis:7 -> docker.io/library/redis:7,
# name:tag@sha256:D -> docker.io/library/name@sha256:D (a digest drops the tag). The first path
# component is a registry only if it has a '.' or ':', is localhost, or (newer containerd) has
# upper-case letters; the build host refuses such references (appliance/images.py).
normalize_image() {
    local ref=$1 name digest="" tag="" domain path first
    name=${ref%%@*}
    [[ "$ref" == *@* ]] && digest=${ref#*@}
    if [[ "${name##*/}" == *:* ]]; then
        tag=${name##*:}
        name=${name%:*}
    fi
    first=${name%%/*}
    if [[ "$name" == */* && ("$first" == *[.:]* || "$first" == localhost || "$first" != "${first,,}") ]]; then
        domain=$first
        path=${name#*/}
    else
        domain=docker.io
        path=$name
    fi
    [[ "$domain" == index.docker.io ]] && domain=docker.io
    [[ "$domain" == docker.io && "$path" != */* ]] && path="library/$path"
    if [[ -n "$digest" ]]; then
        echo "$domain/$path@$digest"
    else
        echo "$domain/$path:${tag:-latest}"
    fi
}

# read_image_set FILE: the declared image set (images.txt, written by the build host), checked
# line by line and printed back as it was: "NAME" or "NAME DIGEST" per line (DIGEST: sha256: and
# 64 lower-case hex digits, pinned by `invoke lock`), blank lines skipped. The exact mirror of
# appliance/images.py's parse_image_list (tests/unit/test_images.py feeds both the same lines): any
# other shape, or a name listed twice, prints the line's number on stderr and returns 1.
read_image_set() {
    local LC_ALL=C file=$1 line number=0 text
    local -A seen=()
    # `read` drops NUL bytes without a word ("a<NUL>b" would read as "ab"): they come through as
    # \001, a control character the line's rule refuses, as the build host's reading does.
    if ! text=$(tr '\000' '\001' <"$file"); then
        echo "$file cannot be read" >&2
        return 1
    fi
    while IFS= read -r line || [[ -n "$line" ]]; do
        number=$((number + 1))
        [[ -n "$line" ]] || continue
        if [[ ! "$line" =~ ^([[:graph:]]+)(\ (sha256:[0-9a-f]{64}))?$ ]]; then
            echo "$file line $number is not \`NAME\` or \`NAME sha256:DIGEST\`: ${line:0:200}" >&2
            return 1
        fi
        if [[ -n "${seen[${BASH_REMATCH[1]}]:-}" ]]; then
            echo "$file line $number lists ${BASH_REMATCH[1]} a second time" >&2
            return 1
        fi
        seen[${BASH_REMATCH[1]}]=1
        printf '%s\n' "$line"
    done <<<"$text"
}

# chart_base DOMAIN [USE_TOP]: the base chart 2.4.0 puts sub-hosts under (casdoor.<base>):
# the domain minus its first label, or the whole domain when it has two labels or USE_TOP=true.
chart_base() {
    local domain=$1 use_top=${2:-false} dots=${1//[^.]/}
    if [[ "$use_top" == true || ${#dots} -le 1 ]]; then
        echo "$domain"
    else
        echo "${domain#*.}"
    fi
}

# coredns_custom_manifest DOMAIN BASE NODE_IP: the coredns-custom ConfigMap that makes CSGHub's
# external names resolve to the node inside the cluster. The same object as
# appliance/manifests.py generates at build time, for when a copy's domain changes
# (csghub-reconfigure); tests/unit/test_manifests_scripts.py compares the two.
coredns_custom_manifest() {
    local domain=$1 base=$2 ip=$3 zone matches
    if [[ "$base" == "$domain" ]]; then
        zone=$domain
        matches="match (^|\\.)${domain//./\\.}\\.\$"
    else
        zone=$base
        matches="match ^[^.]+\\.${base//./\\.}\\.\$
            match (^|\\.)${domain//./\\.}\\.\$"
    fi
    cat <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns-custom
  namespace: kube-system
  labels:
    app.kubernetes.io/managed-by: csghub-appliance
data:
  csghub.server: |
    $zone:53 {
        errors
        template IN A {
            $matches
            answer "{{ .Name }} 60 IN A $ip"
            fallthrough
        }
        template IN AAAA {
            $matches
            rcode NOERROR
            fallthrough
        }
        forward . /etc/resolv.conf
        cache 30
    }
YAML
}
