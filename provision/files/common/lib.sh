# Shared helpers for the provisioning steps. Sourced, not run: a step that uses it declares
# `# appliance: files=common` and sources "$PROVISION_DIR/files/common/lib.sh".
# shellcheck shell=bash

# install_if_changed SRC DEST MODE: install SRC as DEST (root-owned, MODE) when DEST is missing
# or differs in content or mode. Prints a `changed:` or `ok:` line; returns 0 when it changed.
install_if_changed() {
    local src=$1 dest=$2 mode=$3
    if [[ -f "$dest" ]] && cmp -s "$src" "$dest" && [[ "$(stat -c %a "$dest")" == "${mode#0}" ]]; then
        echo "ok: $dest up to date"
        return 1
    fi
    install -D -m "$mode" -o root -g root "$src" "$dest"
    echo "changed: installed $dest"
    return 0
}
