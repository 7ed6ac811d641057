#!/bin/sh
# The README's main job, run from the repository root after `cargo build --release --locked`:
# make the busybox base image, plan the demo build, save the base image as an OCI archive,
# run it with umoci + runc to show the archive is a real, runnable image, and run it in
# rbuild's own sandbox with `rbuild run`.
#
# State goes to target/demo-root (override with RBUILD_ROOT).
set -eu
cd "$(dirname "$0")/.."
rbuild=./target/release/rbuild
export RBUILD_ROOT="${RBUILD_ROOT:-$PWD/target/demo-root}"
work=target/demo
rm -rf "$work"
mkdir -p "$work"

echo "== import busybox (from Debian's busybox-static) as the base image"
testdata/busybox-rootfs.sh "$work/busybox-rootfs.tar"
SOURCE_DATE_EPOCH=0 "$rbuild" import "$work/busybox-rootfs.tar" busybox:latest
"$rbuild" images

echo "== plan the demo build"
"$rbuild" build --dry-run testdata/demo

echo "== save the base image and run it with umoci + runc"
"$rbuild" save -o "$work/busybox.tar" busybox:latest
mkdir -p "$work/layout"
tar -xf "$work/busybox.tar" -C "$work/layout"
# Give the image a command (umoci writes a new manifest into the extracted layout).
umoci config --image "$work/layout:latest" --config.cmd /bin/sh --config.cmd -c \
    --config.cmd 'echo hello from the busybox image rbuild saved'
umoci unpack --image "$work/layout:latest" "$work/bundle" >/dev/null
sed -i 's/"terminal": *true/"terminal": false/' "$work/bundle/config.json"
runc run --bundle "$work/bundle" "rbuild-demo-$$" </dev/null
runc delete --force "rbuild-demo-$$" 2>/dev/null || true
echo "== run the base image in rbuild's own sandbox"
"$rbuild" run --rm --network none busybox sh -c 'echo "hello from rbuild run: $(hostname), pid $$, $(grep CapEff /proc/self/status)"'
"$rbuild" du
