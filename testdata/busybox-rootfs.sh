#!/bin/sh
# Makes a minimal busybox root filesystem tarball from Debian's busybox-static, for
# `rbuild import ROOTFS.tar busybox`: the base image of the demo and of the tests.
#
#   testdata/busybox-rootfs.sh OUT.tar
#
# The tarball is reproducible for one busybox binary: sorted names, numeric owners 0:0,
# every mtime 0.
set -eu
out=${1:?usage: busybox-rootfs.sh OUT.tar}
busybox=${BUSYBOX:-/bin/busybox}
if ! "$busybox" --list-full >/dev/null 2>&1; then
    echo "busybox-rootfs.sh: $busybox is not a busybox binary; install Debian's busybox-static" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/etc" \
    "$root/root" "$root/tmp" "$root/proc" "$root/sys" "$root/dev" "$root/home" "$root/var/tmp"
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 0700 "$root/root"
cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
"$busybox" --list-full | while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    # Relative links, so the tree works wherever it is unpacked.
    depth=$(printf '%s' "$applet" | tr -cd / | wc -c)
    prefix=""
    i=0
    while [ "$i" -lt "$depth" ]; do prefix="../$prefix"; i=$((i + 1)); done
    ln -sf "${prefix}bin/busybox" "$root/$applet"
done
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
daemon:x:1:
nogroup:x:65534:
GROUP
echo "rbuild" >"$root/etc/hostname"
tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$root" -cf "$out" .
