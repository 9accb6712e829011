#!/bin/bash
# mmdebstrap customize hook for the csghub/debian12 base box.
# Usage (by mmdebstrap): basebox-customize.sh ROOT_DIR
# Inputs (environment): BASEBOX_USER, BASEBOX_AUTHORIZED_KEY, BASEBOX_ROOT_UUID, BASEBOX_HOSTNAME.
# Runs on the build host against a fresh tree, so every step writes its result unconditionally.
set -euo pipefail

root=${1:?usage: basebox-customize.sh ROOT_DIR}
data_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
user=${BASEBOX_USER:?}
authorized_key=${BASEBOX_AUTHORIZED_KEY:?}
root_uuid=${BASEBOX_ROOT_UUID:?}
hostname=${BASEBOX_HOSTNAME:?}

in_root() { chroot "$root" "$@"; }
# INITRD=No was for the package installation only (see image.py); the steps below need the default.
unset INITRD

echo "changed: hostname $hostname"
printf '%s\n' "$hostname" >"$root/etc/hostname"
cat >"$root/etc/hosts" <<HOSTS
127.0.0.1	localhost
127.0.1.1	$hostname
::1	localhost ip6-localhost ip6-loopback
HOSTS

echo "changed: fstab mounts UUID=$root_uuid on /"
printf 'UUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$root_uuid" >"$root/etc/fstab"

echo "changed: user $user with passwordless sudo and the build's SSH key"
in_root useradd --create-home --shell /bin/bash --user-group "$user"
# No password at all (locked): the only way in is the key.
in_root passwd --lock "$user" >/dev/null
install -d -m 0700 "$root/home/$user/.ssh"
printf '%s\n' "$authorized_key" >"$root/home/$user/.ssh/authorized_keys"
chmod 0600 "$root/home/$user/.ssh/authorized_keys"
in_root chown -R "$user:$user" "/home/$user/.ssh"
printf '%s ALL=(ALL) NOPASSWD: ALL\n' "$user" >"$root/etc/sudoers.d/$user"
chmod 0440 "$root/etc/sudoers.d/$user"
in_root visudo -c -q -f "/etc/sudoers.d/$user"

echo "changed: systemd-networkd DHCP on en*/eth*"
install -m 0644 "$data_dir/basebox-wired.network" "$root/etc/systemd/network/20-wired.network"
install -d "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat >"$root/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf" <<'UNIT'
# One configured link being online is enough; a second NIC without DHCP must not stall boot.
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=60
UNIT
in_root systemctl enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

echo "changed: root filesystem grows to the disk on every boot"
install -m 0755 "$data_dir/basebox-growroot.sh" "$root/usr/local/sbin/csghub-growroot"
install -m 0644 "$data_dir/basebox-growroot.service" "$root/etc/systemd/system/csghub-growroot.service"
in_root systemctl enable csghub-growroot.service

echo "changed: SSH host keys are made on first boot, not shipped"
rm -f "$root"/etc/ssh/ssh_host_*
install -m 0644 "$data_dir/basebox-ssh-hostkeys.service" "$root/etc/systemd/system/ssh-hostkeys.service"
in_root systemctl enable ssh-hostkeys.service ssh.service
# UseDNS no is the default, stated here so a reverse lookup can never stall logins on an offline appliance.
cat >"$root/etc/ssh/sshd_config.d/10-csghub-box.conf" <<'SSHD'
UseDNS no
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
SSHD

echo "changed: e2scrub timers off (no LVM snapshots to scrub; saves seconds per boot)"
in_root systemctl disable e2scrub_reap.service e2scrub_all.timer

echo "changed: extlinux menu boots /vmlinuz (the symlink follows kernel upgrades)"
install -d "$root/boot/extlinux"
cat >"$root/boot/extlinux/extlinux.conf" <<CONF
DEFAULT debian
PROMPT 0
TIMEOUT 1
LABEL debian
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND root=UUID=$root_uuid ro console=ttyS0,115200n8 console=tty0 quiet
CONF

# The build skips the kernel package's own initramfs run (INITRD=No), so it is made once, here,
# with every package in (an initramfs made by a trigger is updated instead).
if compgen -G "$root/boot/initrd.img-*" >/dev/null; then
    echo "changed: initramfs updated"
    in_root update-initramfs -u -k all
else
    echo "changed: initramfs made"
    in_root update-initramfs -c -k all
fi
# The kernel's own hook did not run, so /initrd.img (which extlinux boots) was never linked.
for kernel in "$root"/boot/vmlinuz-*; do
    version=${kernel##*/vmlinuz-}
    in_root linux-update-symlinks install "$version" "/boot/vmlinuz-$version"
done
for link in vmlinuz initrd.img; do
    if [[ ! -e $root/$link ]]; then
        echo "error: /$link does not lead to a file in the image" >&2
        exit 1
    fi
done

echo "changed: machine-id emptied, so each machine makes its own on first boot"
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log "$root"/tmp/*
