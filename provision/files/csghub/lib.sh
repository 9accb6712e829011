# shellcheck shell=bash
# Pure functions of provision/30-csghub.sh (input as arguments or stdin, output on stdout),
# sourced by it and unit-tested on the build host with canned input
# (tests/unit/test_manifests_scripts.py).

# normalize_image REF: the full name containerd stores, e.g. redis:7 -> docker.io/library/redis:7.
normalize_image() {
    local ref=$1 first last
    first=${ref%%/*}
    if [[ "$ref" != */* ]]; then
        ref="docker.io/library/$ref"
    elif [[ "$first" != *.* && "$first" != *:* && "$first" != localhost ]]; then
        ref="docker.io/$ref"
    fi
    last=${ref##*/}
    if [[ "$ref" != *@* && "$last" != *:* ]]; then
        ref="$ref:latest"
    fi
    echo "$ref"
}

# workload_states < "KIND NS/NAME WANTED READY" lines -> "ready|waiting KIND NS/NAME" lines.
# An empty WANTED counts as 1 (a Deployment without .spec.replicas), an empty READY as 0.
workload_states() {
    awk 'NF >= 2 { want = ($3 == "" ? 1 : $3); have = ($4 == "" ? 0 : $4);
                  print ((have + 0 >= want + 0) ? "ready" : "waiting"), $1, $2 }'
}

# release_images < decoded Helm release (JSON) -> the image references in its manifest.
release_images() {
    grep -oE 'image: *(\\")?[A-Za-z0-9][A-Za-z0-9._/:@-]*' | sed -E 's/^image: *(\\")?//'
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
