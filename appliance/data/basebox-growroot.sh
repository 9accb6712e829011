#!/bin/bash
# Grow the root partition and its ext4 filesystem to the size of the disk.
# Runs on every boot (csghub-growroot.service): when the disk has not grown it changes nothing.
set -euo pipefail

root_dev=$(findmnt --noheadings --output SOURCE --target /)
root_name=$(basename "$(readlink -f "$root_dev")")
sys_dir=/sys/class/block/$root_name
if [[ ! -r $sys_dir/partition ]]; then
    echo "ok: root device $root_dev is not a partition, nothing to grow"
    exit 0
fi
part_number=$(<"$sys_dir/partition")
disk=/dev/$(basename "$(readlink -f "$sys_dir/..")")

# growpart exits 0 when it grew the partition, 1 when there was no room to grow, 2+ on error.
set +e
grow_out=$(growpart "$disk" "$part_number" 2>&1)
grow_rc=$?
set -e
case $grow_rc in
    0) echo "changed: $grow_out" ;;
    1) echo "ok: partition $part_number already fills $disk" ;;
    *) echo "$grow_out" >&2; exit "$grow_rc" ;;
esac

resize_out=$(resize2fs "$root_dev" 2>&1)
if grep -q "Nothing to do" <<<"$resize_out"; then
    echo "ok: filesystem on $root_dev already fills its partition"
else
    echo "changed: $(tail -n 1 <<<"$resize_out")"
fi
