#!/bin/bash
# image/build.sh: Debian bookworm roots, the appliance .deb, and the checked root.
#
#   image/build.sh deb     build/appliance_<version>_<arch>.deb   (make deb)
#   image/build.sh root    build/image-root/: a bookworm root with that .deb installed (make image-check)
#
# Roots (all under build/, which `make clean` removes):
#   roots/base-bookworm-<arch>-<key>.tar   debootstrap --variant=minbase + image/root/packages.txt;
#                                          <key> hashes the suite, arch, mirror and that list, so an
#                                          edited list makes a new one and a re-run reuses it
#   build-root-<arch>/ the base + image/root/build-packages.txt (gcc, python3-dev, python3-venv): the
#                     venv /opt/appliance and the wheels are made here, by the target's own python3
#   image-root/       the base + the .deb (dpkg -i), made anew by every `root`: what the check inspects
#
# ARCH=arm64 builds for the Pi, under build/arm64/; on an x86_64 host that needs qemu-user-static
# and binfmt-support (the arm64 roots' programs then run through qemu). `ARCH=arm64 make image-check`
# checks the arm64 package the same way (about 1 minute warm here, without the boot).
# Needs root (debootstrap, chroot, unshare).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
SUITE=bookworm
HOST_ARCH=$(dpkg --print-architecture)
ARCH=${ARCH:-$HOST_ARCH}
# another architecture's roots and package go to build/<arch>/, so that both can be kept
BUILD=${BUILD:-$REPO/build$([ "$ARCH" = "$HOST_ARCH" ] || echo "/$ARCH")}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

say() { echo "image: $*" >&2; }
packages() { grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$1"; }
hash_of() { sha256sum | cut -c1-16; }

# Run a command inside ROOT with /proc, /sys and /dev mounted in a private mount namespace, so the
# mounts vanish with the command whatever happens, and with a clean environment.
in_root() {
    local root=$1; shift
    unshare --mount --propagation private -- /bin/sh -ec '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount --rbind /sys "$root/sys"
        mount --bind /dev "$root/dev"
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-}" DEBIAN_FRONTEND=noninteractive "$@"
    ' sh "$root" "$@"
}

base_tarball() {
    local key tarball tmp
    key=$( { echo "$SUITE $ARCH $MIRROR"; packages "$HERE"/root/packages.txt; } | hash_of)
    tarball=$BUILD/roots/base-$SUITE-$ARCH-$key.tar
    if [ ! -f "$tarball" ]; then
        command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; } >&2
        mkdir -p "$BUILD"/roots
        tmp=$(mktemp -d "$BUILD"/roots/debootstrap.XXXXXX)
        say "debootstrap $SUITE $ARCH (cached as $(basename "$tarball"))"
        debootstrap --variant=minbase --arch="$ARCH" \
            --include="$(packages "$HERE"/root/packages.txt | paste -sd, -)" "$SUITE" "$tmp"/root "$MIRROR" \
            > "$tmp"/debootstrap.log 2>&1 || { tail -20 "$tmp"/debootstrap.log >&2; exit 1; }
        rm -rf "$tmp"/root/var/cache/apt/archives/*.deb
        tar -C "$tmp"/root --numeric-owner -cf "$tarball".tmp .
        mv "$tarball".tmp "$tarball"
        rm -rf "$tmp"
    fi
    echo "$tarball"
}

build_root() {
    local base key dir=$BUILD/build-root-$ARCH
    base=$(base_tarball)
    key=$( { basename "$base"; packages "$HERE"/root/build-packages.txt; } | hash_of)
    if [ "$(cat "$dir".key 2>/dev/null)" != "$key" ]; then
        say "build root from $(basename "$base") + build-packages.txt"
        rm -rf "$dir" "$dir".key
        mkdir -p "$dir"
        tar -C "$dir" -xf "$base"
        cp /etc/resolv.conf "$dir"/etc/resolv.conf
        in_root "$dir" apt-get update -q >&2
        in_root "$dir" apt-get install -y -q --no-install-recommends \
            $(packages "$HERE"/root/build-packages.txt) >&2
        echo "$key" > "$dir".key
    fi
}

version() {
    local v
    v=$(python3 -c 'import tomllib; print(tomllib.load(open("'"$REPO"'/pyproject.toml", "rb"))["project"]["version"])')
    if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
        v="$v+git$(git -C "$REPO" log -1 --format=%cd --date=format:%Y%m%d%H%M%S).$(git -C "$REPO" rev-parse --short=8 HEAD)"
    fi
    echo "$v"
}

deb() {
    local dir=$BUILD/build-root-$ARCH ver stage lockhash out
    build_root
    ver=$(version)
    export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)}
    lockhash=$(cat "$HERE"/requirements.lock "$HERE"/build-requirements.lock | hash_of)
    # The source: the files git tracks or would (not ignored), as they are in the work tree.
    rm -rf "$dir"/build && mkdir -p "$dir"/build/src
    git -C "$REPO" ls-files -z --cached --others --exclude-standard | tar -C "$REPO" --null -T - -cf - | tar -C "$dir"/build/src -xf -
    # pip inside trusts what the host trusts (a host behind a TLS-inspecting proxy adds its CA there)
    cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$dir"/build/host-ca.crt
    say "venv /opt/appliance in the build root (wheels cached by the locks' hash $lockhash)"
    in_root "$dir" /bin/sh -ec '
        lockhash=$1
        export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1 PIP_CERT=/build/host-ca.crt
        python3 -m venv /build/tools
        /build/tools/bin/pip install -q --require-hashes --no-deps -r /build/src/image/build-requirements.lock
        wheels=/var/cache/appliance-wheels/$lockhash
        if [ ! -f "$wheels"/.complete ]; then
            rm -rf "$wheels"
            # every download checked against the lock; sdists (evdev) built by the pinned setuptools
            /build/tools/bin/pip wheel -q --require-hashes --no-build-isolation -w "$wheels" \
                -r /build/src/image/requirements.lock
            touch "$wheels"/.complete
        fi
        /build/tools/bin/pip wheel -q --no-deps --no-build-isolation -w /build/app /build/src
        rm -rf /opt/appliance
        python3 -m venv --without-pip /opt/appliance
        /build/tools/bin/pip --python /opt/appliance/bin/python3 install -q --no-index --no-deps \
            "$wheels"/*.whl /build/app/*.whl
        # bytecode now: the root is read-only on the Pi; checked-hash pycs stay valid whatever the mtimes
        /opt/appliance/bin/python3 -m compileall -q -j0 --invalidation-mode checked-hash /opt/appliance/lib
    ' sh "$lockhash" >&2
    stage=$BUILD/deb-stage-$ARCH
    rm -rf "$stage" && mkdir -p "$stage"/opt
    cp -a "$dir"/opt/appliance "$stage"/opt/appliance
    "$HERE"/stage.sh "$stage" "$ver" "$ARCH"
    out=$BUILD/appliance_${ver}_${ARCH}.deb
    rm -f "$BUILD"/appliance_*_"$ARCH".deb
    dpkg-deb --root-owner-group -Zgzip --build "$stage" "$out" >&2
    say "built $out ($(du -h "$out" | cut -f1))"
    echo "$out"
}

root() {
    local base deb=${1:-} dir=$BUILD/image-root
    base=$(base_tarball)
    [ -n "$deb" ] || deb=$(ls "$BUILD"/appliance_*_"$ARCH".deb)
    say "image root: $(basename "$base") + $(basename "$deb")"
    rm -rf "$dir" && mkdir -p "$dir"
    tar -C "$dir" -xf "$base"
    mkdir -p "$dir"/tmp/deb && cp "$deb" "$dir"/tmp/deb/
    in_root "$dir" dpkg -i /tmp/deb/"$(basename "$deb")" >&2
    rm -rf "$dir"/tmp/deb
    echo "$dir"
}

case "${1:-}" in
    deb) deb ;;
    root) root "${2:-}" ;;
    in-root) shift; in_root "$@" ;;
    *) echo "usage: $0 deb | root [DEB] | in-root ROOT CMD..." >&2; exit 2 ;;
esac
