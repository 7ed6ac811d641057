#!/bin/sh
# Per-step sandbox overhead, side by side: `/bin/true` run N times (default 50) on the same
# busybox root by
#   - `rbuild run --rm busybox /bin/true` (the whole command: store, snapshot, overlay,
#     namespaces, seccomp, cgroup-less run, clean-up),
#   - `runc run` on an OCI bundle of the same rootfs (runc's default spec: no overlay, no
#     seccomp profile),
#   - `crun run` on the same bundle, when crun is installed.
# Prints milliseconds per run. Run as root from the repository root after
# `cargo build --release --locked`.
set -eu
runs=${1:-50}
cd "$(dirname "$0")/.."
rbuild=$PWD/target/release/rbuild
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
testdata/busybox-rootfs.sh "$work/busybox.tar"
export RBUILD_ROOT="$work/root"
"$rbuild" import "$work/busybox.tar" busybox >/dev/null
"$rbuild" run --rm busybox /bin/true   # unpack the snapshot once

now() { date +%s%N; }
report() { echo "$1: $(( ($3 - $2) / runs / 1000 )) µs/run over $runs runs"; }

start=$(now)
i=0
while [ "$i" -lt "$runs" ]; do "$rbuild" run --rm busybox /bin/true; i=$((i + 1)); done
report "rbuild run" "$start" "$(now)"

mkdir -p "$work/bundle/rootfs"
tar -xf "$work/busybox.tar" -C "$work/bundle/rootfs"
(cd "$work/bundle" && runc spec)
sed -i 's/"terminal": true/"terminal": false/; s/"sh"$/"\/bin\/true"/' "$work/bundle/config.json"
for runtime in runc crun; do
    command -v "$runtime" >/dev/null 2>&1 || { echo "$runtime: not installed"; continue; }
    if ! "$runtime" run --bundle "$work/bundle" "bench-probe-$$" </dev/null; then
        echo "$runtime: cannot run on this machine"
        "$runtime" delete --force "bench-probe-$$" >/dev/null 2>&1 || true
        continue
    fi
    start=$(now)
    i=0
    while [ "$i" -lt "$runs" ]; do
        "$runtime" run --bundle "$work/bundle" "bench-$$-$i" </dev/null
        i=$((i + 1))
    done
    report "$runtime run" "$start" "$(now)"
done
