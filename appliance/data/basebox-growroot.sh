#!/bin/bash
# Grow the root partition and its ext4 filesystem to the size of the disk.
# Runs on every boot (csghub-growroot.service): when the disk has not grown it changes nothing.
# Does what cloud-guest-utils' growpart does for our one-partition MBR disk, without the
# Python that package pulls in: move the partition's end to the disk's end (sfdisk), tell the
# kernel (partx), grow the mounted filesystem (resize2fs, online).
set -euo pipefail

root_dev=$(findmnt --noheadings --output SOURCE --target /)
root_name=$(basename "$(readlink -f "$root_dev")")
sys_dir=/sys/class/block/$root_name
if [[ ! -r $sys_dir/partition ]]; then
    echo "ok: root device $root_dev is not a partition, nothing to grow"
    exit 0
fi
part_number=$(<"$sys_dir/partition")
disk_name=$(basename "$(readlink -f "$sys_dir/..")")
disk=/dev/$disk_name
part_end=$(( $(<"$sys_dir/start") + $(<"$sys_dir/size") ))
disk_sectors=$(<"/sys/block/$disk_name/size")

# Less than 1 MiB (2048 sectors) to gain is not worth a partition-table write.
if (( disk_sectors - part_end < 2048 )); then
    echo "ok: partition $part_number already fills $disk"
else
    sfdisk --quiet --no-reread --no-tell-kernel --force -N "$part_number" "$disk" <<<", +"
    partx --update --nr "$part_number" "$disk"
    echo "changed: partition $part_number of $disk now ends at the disk's end ($disk_sectors sectors)"
fi

resize_out=$(resize2fs "$root_dev" 2>&1)
if grep -q "Nothing to do" <<<"$resize_out"; then
    echo "ok: filesystem on $root_dev already fills its partition"
else
    echo "changed: $(tail -n 1 <<<"$resize_out")"
fi
