#!/bin/bash
# image/stage.sh DEST VERSION ARCH: lay out the appliance package's files under DEST, all but the
# venv (/opt/appliance, which image/build.sh makes inside the build root and copies in), with
# DEBIAN/ control files. `make deb` packs DEST with dpkg-deb; tests/test_image.py checks the tree.
#
# Where things go, and why:
#   /opt/appliance/                    the venv (bin/appliance, bin/python3 -> /usr/bin/python3)
#   /usr/bin/appliance                 -> /opt/appliance/bin/appliance (the unit's ExecStart)
#   /usr/lib/systemd/system/           appliance.service from systemd/ as is; appliance-firstboot.service;
#                                      appliance.service.d/10-provisioned.conf (runs once provisioned)
#   /usr/lib/sysusers.d/appliance.conf, /usr/lib/tmpfiles.d/appliance.conf   from systemd/ as is
#   /usr/lib/modules-load.d/appliance.conf   from systemd/appliance.modules-load: the serial scanners'
#                                      drivers loaded at boot, so the unit's DeviceAllow=char-ttyACM/-USB resolve
#   /etc/udev/rules.d/99-appliance-scanner.rules   a conffile: the technician puts the scanner's IDs in
#   /usr/lib/appliance/appliance-firstboot         first boot's provisioning script
#   /usr/share/appliance/appliance.toml            the image's default config (provisioning's base)
#   /usr/share/doc/appliance/          docs/*.md (the unit's Documentation=), image.md, the example
#                                      provisioning file
set -euo pipefail
DEST=$1 VERSION=$2 ARCH=$3
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")

install -d -m 0755 "$DEST"/DEBIAN "$DEST"/usr/bin "$DEST"/usr/lib/systemd/system/appliance.service.d \
  "$DEST"/usr/lib/sysusers.d "$DEST"/usr/lib/tmpfiles.d "$DEST"/usr/lib/modules-load.d "$DEST"/etc/udev/rules.d "$DEST"/usr/lib/appliance \
  "$DEST"/usr/share/appliance "$DEST"/usr/share/doc/appliance/examples
ln -sfn /opt/appliance/bin/appliance "$DEST"/usr/bin/appliance

install -m 0644 "$REPO"/systemd/appliance.service "$DEST"/usr/lib/systemd/system/appliance.service
install -m 0644 "$HERE"/files/appliance-firstboot.service "$DEST"/usr/lib/systemd/system/
install -m 0644 "$HERE"/files/appliance.service.d/10-provisioned.conf "$DEST"/usr/lib/systemd/system/appliance.service.d/
install -m 0644 "$REPO"/systemd/appliance.sysusers "$DEST"/usr/lib/sysusers.d/appliance.conf
install -m 0644 "$REPO"/systemd/appliance.tmpfiles "$DEST"/usr/lib/tmpfiles.d/appliance.conf
install -m 0644 "$REPO"/systemd/appliance.modules-load "$DEST"/usr/lib/modules-load.d/appliance.conf
install -m 0644 "$HERE"/udev/99-appliance-scanner.rules "$DEST"/etc/udev/rules.d/
install -m 0755 "$HERE"/files/appliance-firstboot "$DEST"/usr/lib/appliance/
install -m 0644 "$HERE"/files/appliance.toml "$DEST"/usr/share/appliance/
install -m 0644 "$REPO"/docs/*.md "$DEST"/usr/share/doc/appliance/
install -m 0644 "$HERE"/README.md "$DEST"/usr/share/doc/appliance/image.md
install -m 0644 "$HERE"/files/appliance-provision.example.toml "$REPO"/examples/appliance.toml \
  "$DEST"/usr/share/doc/appliance/examples/

sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" "$HERE"/deb/control.in > "$DEST"/DEBIAN/control
install -m 0755 "$HERE"/deb/postinst "$HERE"/deb/prerm "$HERE"/deb/postrm "$DEST"/DEBIAN/
( cd "$DEST" && find etc -type f | sed 's|^|/|' | sort ) > "$DEST"/DEBIAN/conffiles
chmod 0644 "$DEST"/DEBIAN/control "$DEST"/DEBIAN/conffiles
