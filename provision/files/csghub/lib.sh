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
