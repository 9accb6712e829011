# Shared helpers for the provisioning steps and the first-boot scripts. Sourced, not run: a
# step that uses it declares `# appliance: files=common` and sources
# "$PROVISION_DIR/files/common/lib.sh"; 40-firstboot.sh installs it as
# /usr/local/lib/csghub-appliance/common.sh for the scripts a copy runs.
# shellcheck shell=bash

# A pipeline's last command runs in this shell (scripts run without job control), so
# `producer | install_if_changed - DEST MODE` leaves FILE_CHANGED where the caller reads it.
shopt -s lastpipe

# die MESSAGE: print "error: MESSAGE" on stderr and end the script.
die() {
    echo "error: $*" >&2
    exit 1
}

# The kubectl of the appliance's k3s, run as "${KC[@]}" ARGS. An array, not a function: a function
# called in an `if` or before `||` runs with `set -e` off, and kubectl's status is what those
# test. A step may append options (KC+=(--request-timeout=30s)).
# shellcheck disable=SC2034  # used by the scripts that source this file
KC=(/usr/local/bin/k3s kubectl)

# install_if_changed [-q] SRC DEST MODE: make DEST hold SRC's content with MODE (SRC `-`: stdin),
# replacing it atomically (a temporary file beside it, renamed) only when it is missing or differs
# in content or mode. The owner is whoever runs it (root, in the guest).
# Reports by output, never by exit status: prints a `changed:` or `ok:` line (none with -q) and
# sets FILE_CHANGED to yes or no. Returns non-zero, saying why on stderr, only when it failed (no
# readable SRC, DEST not writable): under `set -e` that ends the step. Call it as a plain command,
# not in an `if` or before `||` (there `set -e` is off and a failure would pass as an answer).
install_if_changed() {
    local quiet=no src dest mode tmp="" verb=installed ok_note="up to date" have_mode=""
    if [[ "${1:-}" == -q ]]; then
        quiet=yes
        shift
    fi
    if (($# != 3)); then
        echo "error: install_if_changed: expected [-q] SRC DEST MODE, got: $*" >&2
        return 2
    fi
    src=$1 dest=$2 mode=$3
    FILE_CHANGED=no
    if [[ ! "$mode" =~ ^0?[0-7]{3}$ ]]; then
        echo "error: install_if_changed: mode for $dest must be octal like 0644, got '$mode'" >&2
        return 2
    fi
    if ! mkdir -p -- "$(dirname -- "$dest")"; then
        echo "error: cannot create the directory of $dest" >&2
        return 1
    fi
    if [[ "$src" == - ]]; then
        verb=wrote ok_note="already up to date"
        if ! tmp=$(mktemp "$dest.XXXXXX"); then
            echo "error: cannot write beside $dest (read-only or missing permission)" >&2
            return 1
        fi
        if ! cat >"$tmp"; then
            rm -f -- "$tmp"
            echo "error: could not read the content for $dest" >&2
            return 1
        fi
        src=$tmp
    elif [[ ! -f "$src" || ! -r "$src" ]]; then
        echo "error: cannot install $dest: source file $src is missing or unreadable" >&2
        return 1
    fi
    [[ ! -f "$dest" ]] || have_mode=$(stat -c %a -- "$dest")
    if [[ "$have_mode" == "${mode#0}" ]] && cmp -s -- "$src" "$dest"; then
        [[ -z "$tmp" ]] || rm -f -- "$tmp"
        [[ "$quiet" == yes ]] || echo "ok: $dest $ok_note"
        return 0
    fi
    if [[ -z "$tmp" ]]; then
        if ! tmp=$(mktemp "$dest.XXXXXX") || ! cp -- "$src" "$tmp"; then
            [[ -z "$tmp" ]] || rm -f -- "$tmp"
            echo "error: cannot copy $src to beside $dest (read-only, full, or missing permission)" >&2
            return 1
        fi
    fi
    if ! chmod "$mode" "$tmp" || ! mv -f -- "$tmp" "$dest"; then
        rm -f -- "$tmp"
        echo "error: cannot replace $dest" >&2
        return 1
    fi
    # shellcheck disable=SC2034  # read by the caller
    FILE_CHANGED=yes
    [[ "$quiet" == yes ]] || echo "changed: $verb $dest"
    return 0
}
