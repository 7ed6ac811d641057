#!/bin/bash
# Registry transfer speed: `rbuild push` / `rbuild pull` against `skopeo copy` of the same
# ~500 MB image, to and from Debian's `docker-registry` (distribution 2.8) on 127.0.0.1, tools
# interleaved in one run (rbuild push, skopeo push, rbuild pull, skopeo pull, ...), and the
# rbuild/skopeo ratios of the median wall-clock times.
#
#   benches/registry.sh             # from the repository root, after
#                                   # cargo build --release --locked -p rbuild-builder
#
# The image: a busybox rootfs (`rbuild import`, from Debian's busybox-static) and LAYERS
# `COPY` layers of random, incompressible data (from /dev/urandom, generated once and kept in
# WORK/context) totalling SIZE_MB, built by `rbuild build` into WORK/rbuild-root.
#
# Operations, each timed RUNS times:
#   push  rbuild: `rbuild push 127.0.0.1:PORT/rbuild-N:latest`
#         skopeo: `skopeo copy oci:DIR:latest docker://127.0.0.1:PORT/skopeo-N:latest`, where DIR
#                 is the image of `rbuild save` unpacked once (SKOPEO_SOURCE=oci-archive makes
#                 it read the saved tar itself, which adds skopeo's unpacking of the tar)
#         Every push goes to a brand-new registry (fresh storage, new port) and repository, so
#         neither tool can skip or cross-mount a blob (skopeo's blob info cache knows blobs by
#         registry); after each push the registry's storage must hold all the image's bytes.
#   pull  rbuild: `rbuild --root FRESH pull 127.0.0.1:PORT/bench:latest` (blobs into the store,
#                 as skopeo's oci: layout; neither unpacks layers)
#         skopeo: `skopeo copy docker://127.0.0.1:PORT/bench:latest oci:FRESH:latest`
#         from one registry that an untimed rbuild push filled.
#   ci    a CI machine reusing another's work: on a fresh root, `rbuild build --cache-from
#         type=registry,ref=CACHE -o type=image,name=NEW,push=true` of a Dockerfile
#         `FROM <that pulled image>` + COPY + RUN, whose cache another root exported untimed
#         (mode=max). Every step must be CACHED. Reported: seconds and the bytes of blobs the
#         fresh root downloaded. Tools: rbuild, and with CI_BEFORE=/path/to/an/older/rbuild
#         that binary too (e.g. one from before lazy layers), as "before".
#
# Environment:
#   RUNS=3                          timed runs per operation and tool
#   WORK=/tmp/rbuild-registry-bench work directory (the random data is kept and reused; the
#                                   rbuild root, registries and pulled copies are removed at
#                                   the end unless KEEP=1)
#   SIZE_MB=500 LAYERS=4            the random data (MB = 10^6 bytes) and how many COPY layers
#   RBUILD=$CARGO_TARGET_DIR/release/rbuild (CARGO_TARGET_DIR defaults to target)
#   SKOPEO=skopeo  REGISTRY=/usr/bin/docker-registry
#   SKOPEO_SOURCE=oci               or oci-archive (see above)
#   OPERATIONS="push pull ci"       which operations to time
#   CI_BEFORE=                      an older rbuild for the ci operation (see above)
#
# Only 127.0.0.1 is contacted. Results (one line per timed run) and the table are appended to
# WORK/results.txt; logs are in WORK/logs. A failed operation is never timed: the end of its log
# is printed, the table shows FAILED, and the script exits 1.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-3}
work=${WORK:-/tmp/rbuild-registry-bench}
size_mb=${SIZE_MB:-500}
layers=${LAYERS:-4}
rbuild=${RBUILD:-${CARGO_TARGET_DIR:-$repo/target}/release/rbuild}
skopeo=${SKOPEO:-skopeo}
registry_binary=${REGISTRY:-/usr/bin/docker-registry}
skopeo_source=${SKOPEO_SOURCE:-oci}
operations=${OPERATIONS:-push pull ci}
ci_before=${CI_BEFORE:-}

say() { printf '%s\n' "$*" >&2; }
die() { say "registry.sh: $*"; exit 1; }

case $runs in '' | *[!0-9]* | 0) die "RUNS must be a positive number, not '$runs'" ;; esac
case $size_mb in '' | *[!0-9]* | 0) die "SIZE_MB must be a positive number, not '$size_mb'" ;; esac
case $layers in '' | *[!0-9]* | 0) die "LAYERS must be a positive number, not '$layers'" ;; esac
case $skopeo_source in oci | oci-archive) ;; *) die "SKOPEO_SOURCE must be oci or oci-archive, not '$skopeo_source'" ;; esac
[ -x "$rbuild" ] || die "$rbuild is not built (cargo build --release --locked -p rbuild-builder)"
command -v "$skopeo" >/dev/null 2>&1 || die "skopeo is not installed (apt-get install skopeo)"
[ -x "$registry_binary" ] || die "$registry_binary is not installed (apt-get install docker-registry)"
command -v busybox >/dev/null 2>&1 || die "busybox is not installed (apt-get install busybox-static)"
command -v jq >/dev/null 2>&1 || die "jq is not installed (apt-get install jq)"
command -v curl >/dev/null 2>&1 || die "curl is not installed (apt-get install curl)"

mkdir -p "$work"
work=$(cd "$work" && pwd)
logs=$work/logs
results=$work/results.txt
times=$work/times.txt
root=$work/rbuild-root
rm -rf "$logs" "$root" "$work/registries" "$work/pulled" "$work/image-oci" "$work/image.tar"
mkdir -p "$logs" "$work/registries" "$work/pulled"
: >"$times"

# --- registries -------------------------------------------------------------------------

# The pids of the running registries, by name.
declare -A registry_pids=()
registry_port=""

cleanup() {
    local status=$?
    set +e
    local name
    for name in "${!registry_pids[@]}"; do
        kill "${registry_pids[$name]}" 2>/dev/null
        wait "${registry_pids[$name]}" 2>/dev/null
    done
    if [ "${KEEP:-0}" != 1 ]; then
        rm -rf "$root" "$work/registries" "$work/pulled" "$work/image-oci" "$work/image.tar"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_registry NAME: a docker-registry with fresh storage in WORK/registries/NAME on a free
# port of 127.0.0.1; sets registry_port.
start_registry() {
    local name=$1 directory=$work/registries/$1 attempt port pid
    rm -rf "$directory"
    mkdir -p "$directory/storage"
    for attempt in 1 2 3 4 5; do
        # A random port that nothing listens on now; if one takes it meanwhile, the registry
        # exits with "address already in use" and the next attempt picks another.
        port=$((20000 + RANDOM % 40000))
        [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] || continue
        cat >"$directory/config.yml" <<CONFIG
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $directory/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
  secret: rbuild-registry-bench
health:
  storagedriver:
    enabled: false
CONFIG
        "$registry_binary" serve "$directory/config.yml" >"$directory/registry.log" 2>&1 &
        pid=$!
        local tries=0
        # Poll until it answers /v2/ (any HTTP status), exits, or 30 s pass.
        until curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/v2/"; do
            if ! kill -0 "$pid" 2>/dev/null || [ "$tries" -ge 300 ]; then
                break
            fi
            sleep 0.1
            tries=$((tries + 1))
        done
        if kill -0 "$pid" 2>/dev/null && curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/v2/"; then
            registry_pids[$name]=$pid
            registry_port=$port
            return 0
        fi
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        grep -q "address already in use" "$directory/registry.log" || break
    done
    say "registry $name did not start; the end of $directory/registry.log:"
    tail -n 15 "$directory/registry.log" >&2
    die "docker-registry did not start"
}

# stop_registry NAME: stops it and removes its storage.
stop_registry() {
    local name=$1
    kill "${registry_pids[$name]}" 2>/dev/null || true
    wait "${registry_pids[$name]}" 2>/dev/null || true
    unset "registry_pids[$name]"
    rm -rf "$work/registries/$name"
}

# Bytes of blob data in a registry's storage or an OCI layout's blobs directory.
blob_bytes() { find "$1" -type f -name "${2:-*}" -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }

# --- the image --------------------------------------------------------------------------

context=$work/context
make_context() {
    local stamp="size_mb=$size_mb layers=$layers v1" index per_layer
    if [ -f "$context/stamp" ] && [ "$(cat "$context/stamp")" = "$stamp" ]; then
        say "context: reusing $context ($stamp)"
    else
        say "context: generating $size_mb MB of random data in $layers files in $context"
        rm -rf "$context"
        mkdir -p "$context"
        per_layer=$((size_mb * 1000000 / layers))
        for index in $(seq "$layers"); do
            head -c "$per_layer" /dev/urandom >"$context/layer$index.bin"
            [ "$(stat -c %s "$context/layer$index.bin")" = "$per_layer" ] ||
                die "context: $context/layer$index.bin is short"
        done
        echo "$stamp" >"$context/stamp"
    fi
    {
        echo "FROM busybox"
        for index in $(seq "$layers"); do echo "COPY layer$index.bin /data/layer$index.bin"; done
    } >"$context/Dockerfile"
    printf 'stamp\n' >"$context/.dockerignore"
}

# make_image: imports busybox, builds bench:latest, saves it as an OCI layout in
# WORK/image-oci (and WORK/image.tar); sets image_bytes and manifest_digest.
make_image() {
    "$repo/testdata/busybox-rootfs.sh" "$work/busybox.tar"
    "$rbuild" --root "$root" import "$work/busybox.tar" busybox:latest >"$logs/import.log" 2>&1 ||
        { cat "$logs/import.log" >&2; die "rbuild import of the busybox rootfs failed"; }
    say "image: building bench:latest (untimed)"
    "$rbuild" --root "$root" build --progress plain --network none -t bench:latest "$context" \
        >"$logs/build.log" 2>&1 || { tail -n 25 "$logs/build.log" >&2; die "rbuild build failed"; }
    "$rbuild" --root "$root" save -o "$work/image.tar" bench:latest >"$logs/save.log" 2>&1 ||
        { cat "$logs/save.log" >&2; die "rbuild save failed"; }
    mkdir -p "$work/image-oci"
    tar -xf "$work/image.tar" -C "$work/image-oci"
    [ "$skopeo_source" = oci-archive ] || rm -f "$work/image.tar"
    manifest_digest=$(jq -r '.manifests[0].digest' "$work/image-oci/index.json")
    local manifest=$work/image-oci/blobs/sha256/${manifest_digest#sha256:}
    [ -f "$manifest" ] || die "image: the saved layout lacks its manifest $manifest_digest"
    # The bytes that cross the wire: config and layers (the manifest is a few hundred bytes).
    image_bytes=$(jq '.config.size + ([.layers[].size] | add)' "$manifest")
    say "image: $manifest_digest, $(jq '.layers | length' "$manifest") layers, $image_bytes bytes of blobs"
    [ "$image_bytes" -ge $((size_mb * 1000000)) ] || die "image: only $image_bytes bytes; the COPY layers are missing"
}

# --- operations -------------------------------------------------------------------------

declare -A failed=()
status=0
report_failure() { # report_failure OPERATION TOOL WHAT LOG
    say "FAILED: $1 with $2 ($3); the end of $4:"
    tail -n 25 "$4" >&2
    failed["$1 $2"]=1
    status=1
}

# run_operation OPERATION TOOL RUN: one push or pull (untimed set-up around the timed part).
# Prints the seconds, or nothing when it failed.
run_operation() {
    local operation=$1 tool=$2 run=$3 log=$logs/$1-$2-$3.log start end destination
    local check=""
    case "$operation $tool" in
    "push rbuild")
        start_registry "push-$tool-$run"
        destination=127.0.0.1:$registry_port/rbuild-$run:latest
        "$rbuild" --root "$root" tag bench:latest "$destination" >"$log" 2>&1
        start=$(date +%s.%N)
        "$rbuild" --root "$root" push "$destination" >>"$log" 2>&1 || { report_failure "$operation" "$tool" "run $run" "$log"; stop_registry "push-$tool-$run"; return 0; }
        end=$(date +%s.%N)
        # Without this tag the next push has no repository of a live registry to mount from
        # anyway; removing it keeps the store as it was.
        "$rbuild" --root "$root" rmi "$destination" >>"$log" 2>&1
        grep -q '^exists\|^mounted' "$log" && check="rbuild skipped a blob"
        check_stored "$work/registries/push-$tool-$run/storage" "$log" || check="the registry holds only $stored bytes"
        stop_registry "push-$tool-$run"
        ;;
    "push skopeo")
        start_registry "push-$tool-$run"
        destination=docker://127.0.0.1:$registry_port/skopeo-$run:latest
        local source=oci:$work/image-oci:latest
        [ "$skopeo_source" = oci ] || source=oci-archive:$work/image.tar:latest
        start=$(date +%s.%N)
        "$skopeo" copy --dest-tls-verify=false "$source" "$destination" >"$log" 2>&1 || { report_failure "$operation" "$tool" "run $run" "$log"; stop_registry "push-$tool-$run"; return 0; }
        end=$(date +%s.%N)
        grep -qi 'skipped\|already exists' "$log" && check="skopeo skipped a blob"
        check_stored "$work/registries/push-$tool-$run/storage" "$log" || check="the registry holds only $stored bytes"
        stop_registry "push-$tool-$run"
        ;;
    "pull rbuild")
        local pull_root=$work/pulled/rbuild-$run
        rm -rf "$pull_root"
        start=$(date +%s.%N)
        "$rbuild" --root "$pull_root" pull "$pull_source" >"$log" 2>&1 || { report_failure "$operation" "$tool" "run $run" "$log"; rm -rf "$pull_root"; return 0; }
        end=$(date +%s.%N)
        [ "$(tail -n 1 "$log")" = "$manifest_digest" ] || check="rbuild pulled $(tail -n 1 "$log"), not $manifest_digest"
        check_stored "$pull_root" "$log" || check="the store holds only $stored bytes"
        rm -rf "$pull_root"
        ;;
"ci rbuild" | "ci before")
        local binary=$rbuild ci_root=$work/pulled/ci-$tool-$run
        [ "$tool" = rbuild ] || binary=$ci_before
        rm -rf "$ci_root"
        start=$(date +%s.%N)
        "$binary" --root "$ci_root" build --progress plain --network none \
            --metadata-file "$work/ci-metadata.json" --cache-from "type=registry,ref=$ci_cache" \
            --output "type=image,name=$ci_registry/ci-$tool-$run:latest,push=true" "$ci_context" \
            >"$log" 2>&1 || { report_failure "$operation" "$tool" "run $run" "$log"; rm -rf "$ci_root"; return 0; }
        end=$(date +%s.%N)
        [ "$(jq '[.steps[].cached] | all' "$work/ci-metadata.json")" = true ] || check="a step was not CACHED"
        echo "$tool $(blob_bytes "$ci_root/v1/blobs")" >>"$work/ci-bytes.txt"
        rm -rf "$ci_root"
        ;;
    "pull skopeo")
        local layout=$work/pulled/skopeo-$run
        rm -rf "$layout"
        start=$(date +%s.%N)
        "$skopeo" copy --src-tls-verify=false "docker://$pull_source" "oci:$layout:latest" >"$log" 2>&1 || { report_failure "$operation" "$tool" "run $run" "$log"; rm -rf "$layout"; return 0; }
        end=$(date +%s.%N)
        check_stored "$layout" "$log" || check="the layout holds only $stored bytes"
        rm -rf "$layout"
        ;;
    esac
    if [ -n "$check" ]; then
        say "run $run of $operation with $tool did not move the whole image: $check"
        report_failure "$operation" "$tool" "run $run" "$log"
        return 0
    fi
    local seconds
    seconds=$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }')
    echo "$operation $tool $seconds" >>"$times"
    say "  $operation  $tool  run $run: ${seconds}s"
}

# check_stored DIRECTORY LOG: whether DIRECTORY's files hold at least the image's bytes (a
# skipped or mounted blob would leave them short); sets stored.
stored=0
check_stored() {
    stored=$(blob_bytes "$1")
    echo "bytes stored in $1: $stored (image: $image_bytes)" >>"$2"
    [ "$stored" -ge "$image_bytes" ]
}

# --- run --------------------------------------------------------------------------------

make_context
make_image

say "pull source: a registry filled by an untimed rbuild push"
start_registry pull-source
pull_source=127.0.0.1:$registry_port/bench:latest
"$rbuild" --root "$root" tag bench:latest "$pull_source" >"$logs/pull-source.log" 2>&1
"$rbuild" --root "$root" push "$pull_source" >>"$logs/pull-source.log" 2>&1 ||
    { tail -n 25 "$logs/pull-source.log" >&2; die "filling the pull source failed"; }
"$rbuild" --root "$root" rmi "$pull_source" >>"$logs/pull-source.log" 2>&1

ci_tools="rbuild"
: >"$work/ci-bytes.txt"
case " $operations " in *" ci "*)
    say "ci: another root builds FROM the pulled image and exports its cache (untimed)"
    [ -z "$ci_before" ] || [ -x "$ci_before" ] || die "CI_BEFORE=$ci_before is not an executable"
    [ -z "$ci_before" ] || ci_tools="rbuild before"
    ci_registry=127.0.0.1:$registry_port
    ci_cache=$ci_registry/ci-cache:latest
    ci_context=$work/ci-context
    rm -rf "$ci_context"
    mkdir -p "$ci_context"
    echo "built on another machine" >"$ci_context/note.txt"
    printf 'FROM %s\nCOPY note.txt /note.txt\nRUN cat /note.txt > /copied\n' "$pull_source" >"$ci_context/Dockerfile"
    "$rbuild" --root "$root" build --progress plain --network none \
        --cache-to "type=registry,ref=$ci_cache,mode=max" "$ci_context" >"$logs/ci-source.log" 2>&1 ||
        { tail -n 25 "$logs/ci-source.log" >&2; die "exporting the ci cache failed"; }
    ;;
esac

say "$("$rbuild" --version 2>/dev/null || echo rbuild) vs $("$skopeo" --version); $("$registry_binary" --version)"
say "runs: $runs; image: $image_bytes bytes; operations: $operations"
for run in $(seq "$runs"); do
    for operation in $operations; do
        tools="rbuild skopeo"
        [ "$operation" != ci ] || tools=$ci_tools
        for tool in $tools; do
            [ -z "${failed["$operation $tool"]:-}" ] || continue
            run_operation "$operation" "$tool" "$run"
        done
    done
done

# --- table ------------------------------------------------------------------------------

# Medians and ratios: benches/table.sh.
. "$repo/benches/table.sh"
throughput() { awk -v b="$image_bytes" -v s="$1" 'BEGIN { if (s !~ /^[0-9.]+$/ || s == 0) print "-"; else printf "%.1f\n", b / 1000000 / s }'; }

{
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) registry.sh: medians of $runs runs, $image_bytes bytes of blobs" \
        "($layers random layers + busybox), docker-registry on 127.0.0.1; MB/s = 10^6 bytes per second;" \
        "ratio = rbuild time / skopeo time; skopeo source: $skopeo_source"
    printf '%-9s %-7s %9s %8s %14s\n' operation tool "median s" "MB/s" rbuild/skopeo
    for operation in push pull; do
        case " $operations " in *" $operation "*) ;; *) continue ;; esac
        r=$(median "$times" "$operation" rbuild)
        s=$(median "$times" "$operation" skopeo)
        printf '%-9s %-7s %9s %8s %14s\n' "$operation" rbuild "$r" "$(throughput "$r")" "$(ratio "$r" "$s")"
        printf '%-9s %-7s %9s %8s %14s\n' "$operation" skopeo "$s" "$(throughput "$s")" ""
    done
    for tool in $ci_tools; do
        case " $operations " in *" ci "*) ;; *) break ;; esac
        downloaded=$(awk -v t="$tool" '$1 == t { print $2 }' "$work/ci-bytes.txt" | sort -g | tail -n 1)
        printf '%-9s %-7s %9s   downloaded at most %s bytes of blobs\n' ci "$tool" "$(median "$times" ci "$tool")" "${downloaded:--}"
    done
    echo "runs:"
    sed 's/^/  /' "$times"
} | tee -a "$results"
echo "Appended to $results; logs: $logs"
[ "$status" = 0 ] || say "registry.sh: some operations FAILED (above); they are not in the table's times"
exit "$status"
