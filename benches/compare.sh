#!/bin/bash
# Side by side: the same build scenarios with rbuild, `docker build` (BuildKit) and `buildah
# bud`, engines interleaved in one run (rbuild, docker, buildah, rbuild, docker, ...), and
# the rbuild/peer ratios of the median wall-clock times.
#
#   benches/compare.sh              # from the repository root, as root, after
#                                   # cargo build --release --locked -p rbuild-builder
#
# Scenarios (the Dockerfiles are in benches/compare/):
#   no-op       rebuild of an unchanged 20,000-file, 400 MB context (FROM busybox, COPY . /app,
#               a RUN reading one file), everything cached
#   one-change  one file of that context rewritten (new content every time), then a rebuild
#   parallel    four independent stages of ~0.5 s of CPU work each and a final stage copying
#               from all four, --no-cache
#   60-steps    60 trivial RUN steps, --no-cache
#   cold        the 400 MB context build with --no-cache on the warm engine state: the context
#               the engine already holds (BuildKit's synced copy, rbuild's stat cache) and the
#               base image stay, every step runs. This is what `docker build --no-cache` means.
#   cold-root   (rbuild only, for information) the same build into a brand-new --root: base
#               image imported, then the build with no stat cache, no blobs, no snapshots.
#
# Environment:
#   RUNS=5                  timed builds per scenario and engine
#   WORK=/tmp/rbuild-compare  work directory (contexts are kept and reused; engine state is
#                           made fresh every run and removed at the end unless KEEP=1)
#   ENGINES="rbuild docker buildah"
#   SCENARIOS="no-op one-change parallel 60-steps cold cold-root"
#   FILES=20000 SIZE_MB=400 the big context (MB = 10^6 bytes)
#   RBUILD=target/release/rbuild
#   DOCKER=/usr/bin/docker  the Debian 20.10 client (not /usr/local/bin/docker)
#   DOCKER_HOST             use this running daemon instead of starting a private one
#   BUILDAH_JOBS=4          buildah runs stages one after another unless given --jobs
#
# A private dockerd (`--bridge=none --iptables=false`, own socket, data-root, exec-root and
# pidfile under WORK, log in WORK/dockerd.log) is started unless DOCKER_HOST is set, and
# stopped at the end. buildah gets its own --root/--runroot under WORK; its runtime is
# probed (default, then runc, then --isolation chroot). A failed build is never timed: the
# end of its log is printed, that engine sits out the rest of the scenario, the table shows
# FAILED, and the script exits 1.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
templates=$repo/benches/compare
runs=${RUNS:-5}
work=${WORK:-/tmp/rbuild-compare}
engines_wanted=${ENGINES:-rbuild docker buildah}
scenarios=${SCENARIOS:-no-op one-change parallel 60-steps cold cold-root}
files=${FILES:-20000}
size_mb=${SIZE_MB:-400}
rbuild=${RBUILD:-$repo/target/release/rbuild}
docker_client=${DOCKER:-/usr/bin/docker}
buildah_jobs=${BUILDAH_JOBS:-4}

say() { printf '%s\n' "$*" >&2; }
die() { say "compare.sh: $*"; exit 1; }

case $runs in '' | *[!0-9]* | 0) die "RUNS must be a positive number, not '$runs'" ;; esac
[ "$(id -u)" = 0 ] || die "run as root (dockerd, buildah and rbuild's sandbox need it)"

mkdir -p "$work"
work=$(cd "$work" && pwd)
logs=$work/logs
results=$work/results.txt
rm -rf "$logs"
mkdir -p "$logs"
: >"$results"

# --- contexts ---------------------------------------------------------------------------

big=$work/contexts/big
# The file the one-change scenario edits: about the middle of the tree (the generator's layout).
changed_index=$((files * 53 / 100))
per_top=$(((files + 19) / 20))
per_sub=$(((per_top + 9) / 10))
changed_file=$(printf 'd%02d/s%d/f%05d.dat' "$((changed_index / per_top))" \
    "$(((changed_index % per_top) / per_sub))" "$changed_index")
make_big_context() {
    local stamp="files=$files size_mb=$size_mb v1"
    if [ -f "$work/contexts/big.stamp" ] && [ "$(cat "$work/contexts/big.stamp")" = "$stamp" ]; then
        say "context: reusing $big ($stamp)"
    else
        say "context: generating $files files, $size_mb MB in $big"
        rm -rf "$big" "$work/contexts/big.stamp"
        mkdir -p "$big"
        # A deterministic pseudo-random stream (AES-CTR of zeros under a fixed key), cut into
        # files of deterministic sizes (1/4 to 7/4 of the mean) in a 20 x 10 x N tree. openssl
        # dies of SIGPIPE when perl has read enough: only perl's status counts.
        set +o pipefail
        openssl enc -aes-128-ctr -nosalt -K 000102030405060708090a0b0c0d0e0f \
            -iv 00000000000000000000000000000000 -in /dev/zero 2>/dev/null |
            perl -e '
                use strict; use warnings;
                my ($dir, $files, $total) = @ARGV;
                my $mean = $total / $files;
                my $seed = 12345;
                my @sizes;
                my $sum = 0;
                for my $i (0 .. $files - 1) {
                    $seed = ($seed * 1103515245 + 12345) % 2147483648;
                    my $size = int($mean * (0.25 + 1.5 * $seed / 2147483648));
                    push @sizes, $size;
                    $sum += $size;
                }
                $sizes[-1] += $total - $sum;    # exactly $total bytes
                $sizes[-1] = 1 if $sizes[-1] < 1;
                my $per_top = int(($files + 19) / 20);
                my $per_sub = int(($per_top + 9) / 10);
                for my $i (0 .. $files - 1) {
                    my $top = int($i / $per_top);
                    my $sub = int(($i % $per_top) / $per_sub);
                    my $path = sprintf("%s/d%02d/s%d", $dir, $top, $sub);
                    mkdir sprintf("%s/d%02d", $dir, $top);
                    mkdir $path;
                    my $data = "";
                    while (length($data) < $sizes[$i]) {
                        my $got = read(STDIN, $data, $sizes[$i] - length($data), length($data));
                        die "short read" unless $got;
                    }
                    open(my $out, ">", sprintf("%s/f%05d.dat", $path, $i)) or die "$path: $!";
                    binmode $out;
                    print $out $data;
                    close $out or die;
                }
            ' "$big" "$files" "$((size_mb * 1000000))" || die "context: generating $big failed"
        set -o pipefail
        echo "$stamp" >"$work/contexts/big.stamp"
    fi
    [ -f "$big/$changed_file" ] || die "context: $big/$changed_file is missing"
    cp "$templates/big.Dockerfile" "$big/Dockerfile"
    # The one-change edits rewrite this file from its original bytes.
    cp "$big/$changed_file" "$work/contexts/original.dat"
    # Restore it, in case an earlier run stopped mid-way.
    cp "$work/contexts/original.dat" "$big/$changed_file"
    say "context: $(find "$big" -type f | wc -l) files, $(du -sm --apparent-size "$big" | cut -f1) MiB"
}

edits=0
edit_one_file() {
    # New content every time (never seen by any engine before), same size.
    edits=$((edits + 1))
    local size
    size=$(stat -c %s "$work/contexts/original.dat")
    {
        printf 'one-change edit %08d\n' "$edits"
        head -c "$((size - 25))" "$work/contexts/original.dat"
    } >"$big/$changed_file.tmp"
    mv "$big/$changed_file.tmp" "$big/$changed_file"
}

make_small_contexts() {
    mkdir -p "$work/contexts/parallel" "$work/contexts/steps"
    cp "$templates/parallel.Dockerfile" "$work/contexts/parallel/Dockerfile"
    cp "$templates/steps.Dockerfile" "$work/contexts/steps/Dockerfile"
}

# --- engines ----------------------------------------------------------------------------

engines=()
dockerd_pid=""
docker_env=()
buildah_global=()
buildah_run=()

cleanup() {
    local status=$?
    set +e
    if [ -n "$dockerd_pid" ]; then
        say "docker: stopping dockerd (pid $dockerd_pid)"
        kill "$dockerd_pid" 2>/dev/null || true
        local i=0
        while kill -0 "$dockerd_pid" 2>/dev/null && [ "$i" -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
        kill -0 "$dockerd_pid" 2>/dev/null && say "docker: dockerd $dockerd_pid still running"
    fi
    if [ -f "$big/$changed_file" ] && [ -f "$work/contexts/original.dat" ]; then
        cp "$work/contexts/original.dat" "$big/$changed_file"
    fi
    if [ "${KEEP:-0}" != 1 ]; then
        # buildah's overlay storage may hold mounts; unmount before removing.
        if [ -d "$work/buildah-root" ]; then
            buildah "${buildah_global[@]}" rm --all >/dev/null 2>&1 || true
            grep -o " $work/buildah-[^ ]*" /proc/mounts | sort -r | while read -r m; do umount "$m" 2>/dev/null || true; done
        fi
        rm -rf "$work/rbuild-root" "$work/rbuild-cold-root" "$work/docker-data" \
            "$work/docker-exec" "$work/buildah-root" "$work/buildah-run" 2>/dev/null || true
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

busybox_tar=$work/busybox.tar

setup_rbuild() {
    if [ ! -x "$rbuild" ]; then
        say "rbuild: skipped: $rbuild is not built (cargo build --release --locked -p rbuild-builder)"
        return
    fi
    rm -rf "$work/rbuild-root"
    "$rbuild" --root "$work/rbuild-root" import "$busybox_tar" busybox:latest >"$logs/rbuild-import.log" 2>&1 ||
        { cat "$logs/rbuild-import.log" >&2; die "rbuild: import of the busybox rootfs failed"; }
    engines+=(rbuild)
    say "rbuild: $rbuild, root $work/rbuild-root"
}

docker_cli() { env "${docker_env[@]}" "$docker_client" "$@"; }

setup_docker() {
    if [ ! -x "$docker_client" ]; then
        say "docker: skipped: no client at $docker_client (apt-get install docker.io)"
        return
    fi
    if [ -n "${DOCKER_HOST:-}" ]; then
        docker_env=(DOCKER_HOST="$DOCKER_HOST")
        docker_cli version >/dev/null 2>&1 || { say "docker: skipped: no daemon answers at $DOCKER_HOST"; return; }
        say "docker: using the running daemon at $DOCKER_HOST"
    else
        if ! command -v dockerd >/dev/null 2>&1; then
            say "docker: skipped: dockerd is not installed (apt-get install docker.io)"
            return
        fi
        rm -rf "$work/docker-data" "$work/docker-exec"
        # A unix socket path must stay under 108 bytes.
        local socket=$work/docker-exec/docker.sock
        mkdir -p "$work/docker-exec"
        dockerd --bridge=none --iptables=false --ip6tables=false \
            --data-root "$work/docker-data" --exec-root "$work/docker-exec" \
            --pidfile "$work/docker-exec/dockerd.pid" -H "unix://$socket" \
            >"$work/dockerd.log" 2>&1 &
        dockerd_pid=$!
        docker_env=(DOCKER_HOST="unix://$socket")
        local i=0
        until docker_cli version >/dev/null 2>&1; do
            if ! kill -0 "$dockerd_pid" 2>/dev/null || [ "$i" -ge 120 ]; then
                say "docker: skipped: dockerd did not start; the end of $work/dockerd.log:"
                tail -n 15 "$work/dockerd.log" >&2
                kill "$dockerd_pid" 2>/dev/null || true
                dockerd_pid=""
                return
            fi
            sleep 0.5
            i=$((i + 1))
        done
        say "docker: started dockerd (pid $dockerd_pid), log $work/dockerd.log"
    fi
    docker_env+=(DOCKER_BUILDKIT=1)
    docker_cli import "$busybox_tar" busybox:latest >"$logs/docker-import.log" 2>&1 ||
        { cat "$logs/docker-import.log" >&2; die "docker: import of the busybox rootfs failed"; }
    # Probe: a one-RUN build (with FROM: BuildKit's built-in frontend panics without one).
    mkdir -p "$work/contexts/probe"
    printf 'FROM busybox\nRUN echo probe > /probe\n' >"$work/contexts/probe/Dockerfile"
    if ! docker_cli build --network=none --progress=plain -t cmp-probe "$work/contexts/probe" \
        >"$logs/docker-probe.log" 2>&1; then
        say "docker: skipped: a probe build failed; the end of $logs/docker-probe.log:"
        tail -n 15 "$logs/docker-probe.log" >&2
        return
    fi
    engines+=(docker)
    say "docker: $("$docker_client" --version), BuildKit"
}

setup_buildah() {
    if ! command -v buildah >/dev/null 2>&1; then
        say "buildah: skipped: not installed (apt-get install buildah)"
        return
    fi
    buildah_global=(--root "$work/buildah-root" --runroot "$work/buildah-run" --storage-driver overlay)
    rm -rf "$work/buildah-root" "$work/buildah-run"
    local container
    container=$(buildah "${buildah_global[@]}" from scratch 2>"$logs/buildah-import.log") &&
        buildah "${buildah_global[@]}" add "$container" "$busybox_tar" / >>"$logs/buildah-import.log" 2>&1 &&
        buildah "${buildah_global[@]}" commit -q "$container" docker.io/library/busybox:latest \
            >>"$logs/buildah-import.log" 2>&1 &&
        buildah "${buildah_global[@]}" rm "$container" >>"$logs/buildah-import.log" 2>&1 ||
        { cat "$logs/buildah-import.log" >&2; die "buildah: import of the busybox rootfs failed"; }
    mkdir -p "$work/contexts/probe"
    printf 'FROM busybox\nRUN echo probe > /probe\n' >"$work/contexts/probe/Dockerfile"
    # crun (buildah's default) refuses hybrid cgroup v1/v2 hosts; fall back to runc, then chroot.
    local option
    for option in "" "--runtime runc" "--isolation chroot"; do
        # shellcheck disable=SC2206
        local extra=($option)
        if buildah "${buildah_global[@]}" bud "${extra[@]}" --pull=never --layers --no-cache \
            --network=none -t cmp-probe "$work/contexts/probe" >"$logs/buildah-probe.log" 2>&1; then
            buildah_run=("${extra[@]}")
            engines+=(buildah)
            say "buildah: $(buildah --version)${option:+, $option}, root $work/buildah-root"
            return
        fi
        say "buildah: a probe build${option:+ with $option} failed: $(grep -m1 -i error "$logs/buildah-probe.log" || tail -n1 "$logs/buildah-probe.log")"
    done
    say "buildah: skipped: no runtime works here; see $logs/buildah-probe.log"
}

# build ENGINE TAG CONTEXT [--no-cache] [--root DIR]: one build, its output in a log file.
build() {
    local engine=$1 tag=$2 context=$3 no_cache=$4 root=${5:-$work/rbuild-root}
    case $engine in
    rbuild)
        "$rbuild" --root "$root" build --progress plain --network none $no_cache -t "$tag" "$context"
        ;;
    docker)
        docker_cli build --progress=plain --network=none $no_cache -t "$tag" "$context"
        ;;
    buildah)
        local jobs=()
        [ "$tag" = cmp-parallel ] && jobs=(--jobs "$buildah_jobs")
        buildah "${buildah_global[@]}" bud "${buildah_run[@]}" --pull=never --layers \
            --network=none "${jobs[@]}" $no_cache -t "$tag" "$context"
        ;;
    esac
}

# A failed build is never timed: its log's end is printed, the engine sits out the rest of
# that scenario, the table says FAILED, and the script exits 1 after the table.
declare -A failed=()
status=0
report_failure() { # report_failure SCENARIO ENGINE WHAT LOG
    say "FAILED: $1 with $2 ($3); the end of $4:"
    tail -n 25 "$4" >&2
    failed["$1 $2"]=1
    status=1
}

# timed SCENARIO ENGINE RUN TAG CONTEXT NO_CACHE [ROOT]: times one build, records the seconds.
timed() {
    local scenario=$1 engine=$2 run=$3
    shift 3
    [ -z "${failed["$scenario $engine"]:-}" ] || return 0
    local log=$logs/$scenario-$engine-$run.log start end
    start=$(date +%s.%N)
    if ! build "$engine" "$@" >"$log" 2>&1; then
        report_failure "$scenario" "$engine" "run $run" "$log"
        return 0
    fi
    end=$(date +%s.%N)
    local seconds
    seconds=$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }')
    echo "$scenario $engine $seconds" >>"$results"
    say "  $scenario  $engine  run $run: ${seconds}s"
}

# untimed "SCENARIOS" ENGINE TAG CONTEXT NO_CACHE: a warm-up build; if it fails, the engine
# sits out those scenarios.
untimed() {
    local scenarios_served=$1 engine=$2 log=$logs/warmup-$2-$3.log scenario
    shift
    if ! build "$@" >"$log" 2>&1; then
        for scenario in $scenarios_served; do report_failure "$scenario" "$engine" "warm-up" "$log"; done
    fi
}

# --- run --------------------------------------------------------------------------------

command -v busybox >/dev/null 2>&1 || die "busybox is not installed (apt-get install busybox-static)"
"$repo/testdata/busybox-rootfs.sh" "$busybox_tar"
setup_rbuild
setup_docker
setup_buildah
selected=()
for engine in "${engines[@]}"; do
    case " $engines_wanted " in *" $engine "*) selected+=("$engine") ;; *) say "$engine: not in ENGINES" ;; esac
done
engines=("${selected[@]}")
[ "${#engines[@]}" -gt 0 ] || die "no engine can run"
say "engines: ${engines[*]}; runs per scenario: $runs; scenarios: $scenarios"

wants() { case " $scenarios " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if wants no-op || wants one-change || wants cold || wants cold-root; then make_big_context; fi
make_small_contexts

if wants no-op || wants one-change; then
    say "warm-up: first build of the big context"
    for engine in "${engines[@]}"; do untimed "no-op one-change" "$engine" cmp-big "$big" ""; done
fi
if wants no-op; then
    say "scenario no-op"
    for run in $(seq "$runs"); do
        for engine in "${engines[@]}"; do timed no-op "$engine" "$run" cmp-big "$big" ""; done
    done
fi
if wants one-change; then
    say "scenario one-change ($changed_file)"
    for run in $(seq "$runs"); do
        for engine in "${engines[@]}"; do
            edit_one_file
            timed one-change "$engine" "$run" cmp-big "$big" ""
        done
    done
    cp "$work/contexts/original.dat" "$big/$changed_file"
fi
if wants parallel; then
    say "scenario parallel"
    for run in $(seq "$runs"); do
        for engine in "${engines[@]}"; do
            timed parallel "$engine" "$run" cmp-parallel "$work/contexts/parallel" --no-cache
        done
    done
fi
if wants 60-steps; then
    say "scenario 60-steps"
    for run in $(seq "$runs"); do
        for engine in "${engines[@]}"; do
            timed 60-steps "$engine" "$run" cmp-steps "$work/contexts/steps" --no-cache
        done
    done
fi
if wants cold; then
    say "scenario cold (--no-cache, warm engine state)"
    for engine in "${engines[@]}"; do untimed cold "$engine" cmp-big "$big" ""; done
    for run in $(seq "$runs"); do
        for engine in "${engines[@]}"; do timed cold "$engine" "$run" cmp-big "$big" --no-cache; done
    done
fi
if wants cold-root && [[ " ${engines[*]} " == *" rbuild "* ]]; then
    say "scenario cold-root (rbuild only: a new --root each run)"
    for run in $(seq "$runs"); do
        rm -rf "$work/rbuild-cold-root"
        "$rbuild" --root "$work/rbuild-cold-root" import "$busybox_tar" busybox:latest >/dev/null
        timed cold-root rbuild "$run" cmp-big "$big" "" "$work/rbuild-cold-root"
    done
    rm -rf "$work/rbuild-cold-root"
fi

# --- table ------------------------------------------------------------------------------

# Medians and ratios: benches/table.sh.
. "$repo/benches/table.sh"
target() {
    case $1 in
    no-op | one-change) echo "<=0.20" ;; parallel) echo "<=0.80" ;; 60-steps) echo "<=0.33" ;;
    cold) echo "<=0.30" ;; *) echo "-" ;;
    esac
}

echo
echo "Medians of $runs runs, seconds (wall clock); ratios are rbuild/peer; target is rbuild/BuildKit"
printf '%-11s %9s %9s %9s %13s %14s %8s\n' scenario rbuild docker buildah rbuild/docker rbuild/buildah target
for scenario in $scenarios; do
    r=$(median "$results" "$scenario" rbuild)
    d=$(median "$results" "$scenario" docker)
    b=$(median "$results" "$scenario" buildah)
    printf '%-11s %9s %9s %9s %13s %14s %8s\n' "$scenario" "$r" "$d" "$b" \
        "$(ratio "$r" "$d")" "$(ratio "$r" "$b")" "$(target "$scenario")"
done
echo
echo "All times: $results; build logs: $logs"
[ "$status" = 0 ] || say "compare.sh: some builds FAILED (above); they are not in the table's times"
exit "$status"
