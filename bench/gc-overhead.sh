#!/usr/bin/env bash
# What the automatic GC adds to a build: the same build (10 RUN steps,
# --no-cache, so every run adds records and layers, as a busy runner's
# state grows) timed from start to the exit of `kiln build`, with
# kiln.toml's `gc = true` (the default: after the result is printed,
# kiln measures its state and starts a detached collector only when it
# is over the limit) and `gc = false`, interleaved in RUNS rounds on one
# state directory. Then `kiln prune --auto`'s own time (from
# STATE/gc.json) within the limit (the measurement alone) and over it
# (a collection that frees records).
#
# Run as root; kiln runs as the unprivileged user kiln-bench.
#   bench/gc-overhead.sh [RUNS]          (default 20)
#   KILN=path/to/kiln bench/gc-overhead.sh   (else a release build)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=${1:-20}
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "RUNS must be a positive integer, got '$RUNS'" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
"$HERE/../scripts/setup-host.sh" >/dev/null
KILN_BIN=${KILN:-$("$HERE/../scripts/build-release.sh")}
USER_NAME=kiln-bench
id "$USER_NAME" >/dev/null 2>&1 || useradd -m -s /bin/sh "$USER_NAME"
for f in /etc/subuid /etc/subgid; do
    grep -q "^$USER_NAME:" "$f" || echo "$USER_NAME:400000:65536" >> "$f"
done

S=/var/tmp/kiln-bench-gc
rm -rf "$S"; mkdir -p "$S/ctx/rootfs/bin"
cp /bin/busybox "$S/ctx/rootfs/bin/"
for a in sh echo head; do ln -s busybox "$S/ctx/rootfs/bin/$a"; done
{
    echo "FROM scratch"
    echo "COPY rootfs/ /"
    for i in $(seq 1 10); do echo "RUN head -c 100000 /dev/urandom > /f$i"; done
} > "$S/ctx/Dockerfile"
cp "$KILN_BIN" "$S/kiln"
echo "gc = true" > "$S/gc-on.toml"
echo "gc = false" > "$S/gc-off.toml"
echo 'gc-keep-storage = "4MB"' > "$S/gc-small.toml"
chown -R "$USER_NAME:" "$S"; chmod 755 "$S"

as_user() { setpriv --reuid "$USER_NAME" --regid "$USER_NAME" --init-groups --reset-env \
    env HOME="/home/$USER_NAME" "$@"; }
build() { # CONFIG -> wall seconds to the build's exit
    local t0 t1
    t0=$(date +%s.%N)
    as_user KILN_CONFIG="$S/$1" "$S/kiln" --root "$S/state" build -q --no-cache "$S/ctx" >/dev/null
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc
}
wait_gc() { # wait for the collector started by the last build to finish
    while pgrep -u "$USER_NAME" -f "prune --auto" >/dev/null; do sleep 0.05; done
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

build gc-off.toml >/dev/null   # warm the page cache
: > "$S/on"; : > "$S/off"; : > "$S/check"
for r in $(seq 1 "$RUNS"); do
    if (( r % 2 )); then order="on off"; else order="off on"; fi
    for o in $order; do
        build "gc-$o.toml" >> "$S/$o"
        wait_gc
    done
done
for r in $(seq 1 "$RUNS"); do
    as_user KILN_CONFIG="$S/gc-on.toml" "$S/kiln" --root "$S/state" prune --auto >/dev/null
    jq -r .seconds "$S/state/gc.json" >> "$S/check"
done
layers=$(find "$S/state/snapshots/layers" -mindepth 1 -maxdepth 1 | wc -l)
on=$(median < "$S/on"); off=$(median < "$S/off"); check=$(median < "$S/check")
build gc-small.toml >/dev/null; wait_gc
collect=$(jq -r '"\(.seconds) s, \(.before) -> \(.after) bytes, \(.removed) removed"' "$S/state/gc.json")

echo "runs: $RUNS of each, interleaved; state at the end: $layers layers"
printf 'build to exit, gc = true : %.3f s (median)\n' "$on"
printf 'build to exit, gc = false: %.3f s (median)\n' "$off"
printf 'difference               : %+.3f s\n' "$(echo "$on - $off" | bc)"
printf 'measurement, within limit: %.4f s (median of kiln prune --auto)\n' "$check"
echo "collector, over the limit: $collect"
