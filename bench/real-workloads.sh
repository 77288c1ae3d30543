#!/usr/bin/env bash
# Real workloads on a Debian base, side by side: kiln binaries (e.g. before
# and after a change) and, when dockerd is installed, BuildKit rootful
# (dockerd 20.10's embedded BuildKit, the best peer on these machines).
#
#   bench/real-workloads.sh [RUNS] [SCENARIOS...]    (default 3, cpusr)
#   KILNS="old=/path/kiln new=/path/kiln" bench/real-workloads.sh 5 cpusr
#
# Scenarios (Dockerfiles written to $W/ctx/NAME, usable by any builder):
#   cpusr      FROM debian-local:bookworm + RUN cp -a /usr /usr2 (about
#              120 MB of ordinary files in one step's layer), into the store
#   cpusr-oci  the same, exported with -o type=oci (gzip layers): the
#              image leaves the store, so its layers are compressed (kiln
#              only; dockerd 20.10's `docker build` has no OCI output)
#   aptbuild   two stages: apt-get install gcc libc6-dev python3
#              python3-venv (apt cache mounts), a static C compile, pip
#              install into a venv (PyPI), and a slim final stage with the
#              binary and the venv; host network for every builder
# The base is a debootstrap minbase bookworm tree (made from the machine's
# own apt mirror, kept in /var/tmp as vm-tests/tests/build_debian.rs keeps
# it), gzip-compressed as a pulled base is, imported into each kiln state
# directory and into dockerd as debian-local:bookworm. Every timed build runs with --no-cache from a store
# holding only the base. Runs are interleaved; the table prints the median
# wall seconds and the ratio to the first column.
#
# Run as root: kiln runs as the unprivileged user kiln-bench.
set -euo pipefail
shopt -s inherit_errexit
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=${1:-3}
shift || true
SCENARIOS=${*:-cpusr}
U=kiln-bench
W=/tmp/kiln-bench/real
TAR=/var/tmp/kiln-debian-bookworm-minbase.tar
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
if [ -z "${KILNS:-}" ]; then
    KILNS="kiln=$("$HERE/../scripts/build-release.sh")"
fi
id "$U" >/dev/null 2>&1 || useradd -m -s /bin/sh "$U"
for f in /etc/subuid /etc/subgid; do grep -q "^$U:" "$f" || echo "$U:400000:65536" >> "$f"; done

if [ ! -f "$TAR" ]; then
    mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
    d=$(mktemp -d /var/tmp/kiln-debootstrap-XXXX)
    debootstrap --variant=minbase bookworm "$d" "${mirror:-http://deb.debian.org/debian}" >/dev/null
    tar -C "$d" -cf "$TAR.partial" . && mv "$TAR.partial" "$TAR" && rm -rf "$d"
fi

rm -rf "$W"; mkdir -p "$W/ctx"
# ext4 does not hand out an inode freed within the last 30 s without a
# scan (recently_deleted()); after a mass delete that scan dominated the
# system time of every build that followed (found with perf). Nothing is
# deleted between timed runs (each gets a state directory of its own),
# and the deletions above are left to age first.
sync; sleep 35
# gzip-compressed, as a base pulled from a registry is stored
gzip -6 -c "$TAR" > "$W/debian.tar"
for s in $SCENARIOS; do
    mkdir -p "$W/ctx/$s"
    case $s in
    cpusr|cpusr-oci) printf 'FROM debian-local:bookworm\nRUN cp -a /usr /usr2\n' > "$W/ctx/$s/Dockerfile" ;;
    aptbuild)
        cat > "$W/ctx/$s/Dockerfile" <<'DF'
FROM debian-local:bookworm AS build
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    rm -f /etc/apt/apt.conf.d/docker-clean && apt-get update -q && \
    apt-get install -y -q --no-install-recommends gcc libc6-dev python3 python3-venv
COPY hello.c /src/hello.c
RUN gcc -static -O2 -o /hello /src/hello.c
COPY host-ca.crt /etc/ssl/certs/host-ca.crt
ENV PIP_CERT=/etc/ssl/certs/host-ca.crt
RUN python3 -m venv /venv && /venv/bin/pip install -q --no-cache-dir six==1.16.0 idna==3.7 packaging==24.1
FROM debian-local:bookworm
RUN apt-get -h >/dev/null
COPY --from=build /hello /usr/local/bin/hello
COPY --from=build /venv /venv
RUN /usr/local/bin/hello
DF
        printf '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n' > "$W/ctx/$s/hello.c"
        # the host's trust roots: on machines whose HTTPS goes through an
        # intercepting proxy, pip needs its CA as the host does
        cp /etc/ssl/certs/ca-certificates.crt "$W/ctx/$s/host-ca.crt" ;;
    *) echo "unknown scenario $s" >&2; exit 1 ;;
    esac
done
chown -R "$U" "$W"

as_user() { (cd "$W" && runuser -u "$U" -- env -i HOME="/home/$U" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"); }
names=()
for kv in $KILNS; do
    n=${kv%%=*}; bin=${kv#*=}
    cp "$bin" "$W/kiln-$n"; chmod 755 "$W/kiln-$n"
    names+=("$n")
done
DOCKER_SOCK=unix:///tmp/bench/docker/docker.sock
if command -v dockerd >/dev/null; then
    "$HERE/../../shared/bench/dockerd.sh" start >/dev/null
    /usr/bin/docker -H "$DOCKER_SOCK" import "$W/debian.tar" debian-local:bookworm >/dev/null
    names+=(buildkit)
fi

# one timed build of scenario $1 by builder $2, run $3; prints wall seconds
run_one() {
    local s=$1 n=$2 start end
    local r=$3
    if [ "$n" = buildkit ] && [ "$s" = cpusr-oci ]; then
        echo 0; return
    elif [ "$n" = buildkit ]; then
        # --no-cache rebuilds; the old results stay (no deletes, see above)
        local net=none
        if [ "$s" = aptbuild ]; then
            # cold, as kiln's fresh state directory is: no cache mounts
            # from the last run (then let the deletes age, see above)
            /usr/bin/docker -H "$DOCKER_SOCK" builder prune -af >/dev/null 2>&1 || true
            sync; sleep 35
            net=host
        fi
        start=$(date +%s.%N)
        DOCKER_BUILDKIT=1 /usr/bin/docker -H "$DOCKER_SOCK" build -q --no-cache --network "$net" -t "bench-$s" "$W/ctx/$s" >/dev/null
        end=$(date +%s.%N)
    else
        local st="$W/state-$n-$s-$r"
        as_user "$W/kiln-$n" --root "$st" import --tag debian-local:bookworm "$W/debian.tar" >/dev/null
        sync
        start=$(date +%s.%N)
        local out=(-t "bench-$s")
        [ "$s" != aptbuild ] || out+=(--network host --allow network.host)
        [ "$s" != cpusr-oci ] || out=(-o "type=oci,dest=$st.oci.tar")
        as_user "$W/kiln-$n" --root "$st" build --no-cache --progress quiet "${out[@]}" "$W/ctx/$s" >/dev/null
        end=$(date +%s.%N)
    fi
    echo "$end - $start" | bc
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

printf '%-10s' scenario; for n in "${names[@]}"; do printf ' %12s' "$n"; done; echo
for s in $SCENARIOS; do
    declare -A times=()
    for r in $(seq 1 "$RUNS"); do
        for n in "${names[@]}"; do
            times[$n]+="$(run_one "$s" "$n" "$r") "
        done
    done
    printf '%-10s' "$s"
    first=
    for n in "${names[@]}"; do
        m=$(echo "${times[$n]}" | tr ' ' '\n' | grep . | median)
        [ -n "$first" ] || first=$m
        printf ' %6.2f (%.2fx)' "$m" "$(echo "$m / $first" | bc -l)"
    done
    echo
    unset times
done
