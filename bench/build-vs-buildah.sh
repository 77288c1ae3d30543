#!/usr/bin/env bash
# kiln build side by side with rootless `buildah bud --layers` on the peer
# benchmark scenarios (../shared/bench/scenarios: steps10, ctx2k, noop,
# parallel, manyfiles, bigfile), interleaved runs, median wall seconds and
# the ratio buildah/kiln per scenario (> 1 means kiln is faster).
#
# Run as root: it installs the tools, creates the unprivileged user
# kiln-bench with a subordinate range, and runs both builders as that user.
# Every timed build starts from a store holding only the base image, except
# noop, which is timed after a warm-up build of the same context.
#   bench/build-vs-buildah.sh [RUNS] [SCENARIOS...]   (default 3, all)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SCEN_DIR=${SCEN_DIR:-$HERE/../../shared/bench/scenarios}
RUNS=${1:-3}
shift || true
SCENARIOS=${*:-steps10 ctx2k noop parallel manyfiles bigfile}
U=kiln-bench
W=/tmp/kiln-bench/build
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ -d "$SCEN_DIR" ] || { echo "scenarios not found at $SCEN_DIR (set SCEN_DIR)" >&2; exit 1; }
"$HERE/../scripts/setup-host.sh" >/dev/null
command -v buildah >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah runc >/dev/null
KILN_RELEASE=$("$HERE/../scripts/build-release.sh")
id "$U" >/dev/null 2>&1 || useradd -m -s /bin/sh "$U"
for f in /etc/subuid /etc/subgid; do grep -q "^$U:" "$f" || echo "$U:400000:65536" >> "$f"; done

as_user() { (cd "$W" && runuser -u "$U" -- env -i HOME="/home/$U" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"); }
buildah_() { as_user buildah --root "$W/buildah/root" --runroot "$W/buildah/run" --storage-driver overlay "$@"; }
kiln_() { as_user "$W/kiln" --root "$W/kiln-state" "$@"; }

# --- one-time setup: base image, contexts ----------------------------------
if [ -d "$W/buildah" ]; then as_user buildah unshare rm -rf "$W/buildah" 2>/dev/null || true; fi
rm -rf "$W"; mkdir -p "$W/rootfs"/{bin,etc,tmp,proc,dev,sys} "$W/ctx"
cp /bin/busybox "$W/rootfs/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$W/rootfs/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$W/rootfs/etc/passwd"
chmod 1777 "$W/rootfs/tmp"
cp "$KILN_RELEASE" "$W/kiln"
for s in $SCENARIOS; do
    mkdir -p "$W/ctx/$s"
    cp "$SCEN_DIR/$s/Dockerfile" "$W/ctx/$s/Dockerfile"
done
# ctx2k and noop: 2,000 files of 1-19 KiB in 20x10 directories.
for s in ctx2k noop; do
    case " $SCENARIOS " in *" $s "*) ;; *) continue ;; esac
    python3 - "$W/ctx/$s/ctx" <<'PY'
import os, sys, random
root = sys.argv[1]
rng = random.Random(7919)
i = 0
for a in range(20):
    for b in range(10):
        d = os.path.join(root, f"d{a:02}", f"s{b}")
        os.makedirs(d, exist_ok=True)
        for c in range(10):
            with open(os.path.join(d, f"f{c}.bin"), "wb") as f:
                f.write(rng.randbytes(1024 * (1 + (i * 7919) % 19)))
            i += 1
PY
done
chown -R "$U:" "$W"; chmod 755 /tmp/kiln-bench
as_user tar -C "$W/rootfs" -cf "$W/base.tar" .
mkdir -p "$W/buildah"; chown "$U:" "$W/buildah"

reset_kiln() {
    rm -rf "$W/kiln-state"
    kiln_ import "$W/base.tar" -t localhost/busybox-base:latest >/dev/null
    [ -f "$W/base-docker.tar" ] || kiln_ save localhost/busybox-base:latest --output "type=docker,dest=$W/base-docker.tar" >/dev/null
}
reset_buildah() {
    buildah_ rm --all >/dev/null 2>&1 || true
    buildah_ rmi --all --force >/dev/null 2>&1 || true
    buildah_ pull -q "docker-archive:$W/base-docker.tar" >/dev/null
    buildah_ tag "$(buildah_ images -q | head -1)" localhost/busybox-base:latest
}
build_kiln() { kiln_ build --progress quiet -f "$W/ctx/$1/Dockerfile" -t "bench-$1" "$W/ctx/$2" >/dev/null; }
build_buildah() {
    buildah_ bud --layers --pull=never --jobs=2 -q --isolation=oci --runtime /usr/sbin/runc --network=none \
        -f "$W/ctx/$1/Dockerfile" -t "localhost/bench-$1" "$W/ctx/$2" >/dev/null
}
timed() { local t0 t1; t0=$(date +%s%N); "$@"; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-10s %10s %10s %8s\n' scenario "kiln s" "buildah s" "ratio"
for s in $SCENARIOS; do
    ctx=$s; [ "$s" = noop ] && ctx=noop
    tk=() tb=()
    for _ in $(seq "$RUNS"); do
        reset_kiln
        [ "$s" = noop ] && build_kiln "$s" "$ctx"
        tk+=("$(timed build_kiln "$s" "$ctx")")
        reset_buildah
        [ "$s" = noop ] && build_buildah "$s" "$ctx"
        tb+=("$(timed build_buildah "$s" "$ctx")")
    done
    mk=$(echo "${tk[@]}" | median); mb=$(echo "${tb[@]}" | median)
    awk -v s="$s" -v k="$mk" -v b="$mb" 'BEGIN {printf "%-10s %10.3f %10.3f %7.2fx\n", s, k/1000, b/1000, b/k}'
done
