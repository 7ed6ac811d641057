#!/bin/sh
# The README's main job, run from the repository root after `cargo build --release --locked`:
# make the busybox base image, build the demo image from testdata/demo, run it with
# `rbuild run`, rebuild it (every step cached), and save it as an OCI archive that umoci and
# runc run too.
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

echo "== build the demo image"
"$rbuild" build -t rbuild-demo:latest --progress plain testdata/demo

echo "== run it"
"$rbuild" run --rm rbuild-demo:latest

echo "== build it again: every step comes from the cache"
"$rbuild" build -t rbuild-demo:latest --progress plain testdata/demo 2>&1 | grep -E 'CACHED|writing image'
"$rbuild" images

echo "== save it and run it with umoci + runc"
"$rbuild" save -o "$work/demo.tar" rbuild-demo:latest
mkdir -p "$work/layout"
tar -xf "$work/demo.tar" -C "$work/layout"
umoci unpack --image "$work/layout:latest" "$work/bundle" >/dev/null
sed -i 's/"terminal": *true/"terminal": false/' "$work/bundle/config.json"
runc run --bundle "$work/bundle" "rbuild-demo-$$" </dev/null
runc delete --force "rbuild-demo-$$" 2>/dev/null || true
"$rbuild" du
