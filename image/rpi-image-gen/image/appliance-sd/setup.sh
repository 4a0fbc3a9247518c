#!/bin/sh
# genimage's exec-pre for each filesystem ($IMAGEMOUNTPATH is its tree): the mounts of the
# read-only root with its data partition, and the kernel command line that makes the root an overlay.
set -eu
case $1 in
ROOT)
    # / is the overlay's lower layer (overlayroot mounts it read-only under a tmpfs, whatever this
    # line says). /boot/firmware stays read-only and root-only (the provisioning file holds secrets
    # until first boot moves them); appliance-firstboot remounts it rw for its few writes. /data
    # is the only partition written at run time; its subtrees are bound where the system looks.
    cat > "$IMAGEMOUNTPATH"/etc/fstab <<'FSTAB'
LABEL=rootfs    /                   ext4  ro,noatime,errors=remount-ro                       0 1
LABEL=bootfs    /boot/firmware      vfat  ro,noatime,fmask=0077,dmask=0077,errors=remount-ro  0 2
LABEL=appdata   /data               ext4  rw,noatime,nodev,nosuid,noexec,errors=remount-ro   0 2
/data/state     /var/lib/appliance  none  bind,x-systemd.requires-mounts-for=/data           0 0
/data/etc       /etc/appliance      none  bind,x-systemd.requires-mounts-for=/data           0 0
/data/journal   /var/log/journal    none  bind,x-systemd.requires-mounts-for=/data           0 0
FSTAB
    ;;
BOOT)
    # overlayroot=tmpfs:recurse=0: the root alone is overlaid (writes go to RAM and vanish at
    # reboot); the other mounts above are the real partitions. No resize of the root at first boot.
    sed -i -e 's| init=[^ ]*||' -e 's|root=[^ ]*|root=LABEL=rootfs|' \
        -e 's|$| overlayroot=tmpfs:recurse=0|' "$IMAGEMOUNTPATH"/cmdline.txt
    ;;
esac
