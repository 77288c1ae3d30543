#!/usr/bin/env bash
# Real workloads on a Debian base, side by side: kiln binaries (e.g. before
# and after a change) and, when dockerd is installed, BuildKit rootful
# (dockerd 20.10's embedded BuildKit, the best peer on these machines).
#
#   bench/real-workloads.sh [RUNS] [SCENARIOS...]    (default 3, cpusr)
#   KILNS="old=/path/kiln new=/path/kiln" bench/real-workloads.sh 5 cpusr
#
# Scenarios (Dockerfiles and contexts in $W/ctx/NAME and, for the larger
# ones, from bench/gen-scenarios.sh; any builder can run them):
#   cpusr      FROM debian-local:bookworm + RUN cp -a /usr /usr2 (about
#              120 MB of ordinary files in one step's layer), into the store
#   cpusr-oci  the same, exported with -o type=oci (gzip layers): the
#              image leaves the store, so its layers are compressed (kiln
#              only; dockerd 20.10's `docker build` has no OCI output)
#   aptbuild   two stages: apt-get install gcc libc6-dev python3
#              python3-venv (apt cache mounts), a static C compile, pip
#              install into a venv (PyPI), and a slim final stage with the
#              binary and the venv; host network for every builder
#   ctx50k     COPY . /src of a generated 50,000-file, 600 MB monorepo and a
#              RUN reading a few files; timed three times on one store: cold
#              (ctx50k), a rebuild with nothing changed (ctx50k-noop), and a
#              rebuild after one source file changed (ctx50k-touch)
#   export1g   a RUN writing 1 GiB (half random, half text), exported with
#              -o type=oci,compression=gzip (export1g-gzip) and zstd
#              (export1g-zstd); kiln only (no OCI output in dockerd 20.10).
#              Also prints pigz -p 2 and zstd -T2 on a tar of the same kind
#              of data, and kiln's own export time from its progress line
#   stages20   20 stages, fan-out and fan-in, each a short RUN and COPY --from
#   coldcache  a 600 MB build cached in a local registry (docker-registry on
#              127.0.0.1): kiln --cache-from type=registry (mode=max cache
#              export), BuildKit --cache-from an image with inline cache;
#              time from a store holding only the base to the cached result
# The base is a debootstrap minbase bookworm tree (made from the machine's
# own apt mirror, kept in /var/tmp as vm-tests/tests/build_debian.rs keeps
# it), gzip-compressed as a pulled base is, imported into each kiln state
# directory and into dockerd as debian-local:bookworm. Every cold build runs
# from a store holding only the base. Runs are interleaved; the table
# prints the median wall seconds, the ratio to the first column, and kiln's
# peak RSS (the largest process of kiln's tree, /usr/bin/time's maximum
# resident set size, max over runs). Raw runs go to $W/runs.tsv.
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
SCEN=${KILN_SCENARIO_DIR:-/var/tmp/kiln-bench-scenarios}
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
gen=()
for s in $SCENARIOS; do
    case $s in ctx50k|export1g|stages20|coldcache) gen+=("$s") ;; esac
done
[ ${#gen[@]} = 0 ] || "$HERE/gen-scenarios.sh" "$SCEN" debian-local:bookworm "${gen[@]}"
chmod -R a+rX "$SCEN" 2>/dev/null || true
# ext4 does not hand out an inode freed within the last 30 s without a
# scan (recently_deleted()); after a mass delete that scan dominated the
# system time of every build that followed (found with perf). Nothing is
# deleted between timed runs (each gets a state directory of its own),
# and the deletions above are left to age first.
sync; sleep 35
# gzip-compressed, as a base pulled from a registry is stored
gzip -6 -c "$TAR" > "$W/debian.tar"
for s in $SCENARIOS; do
    case $s in
    cpusr|cpusr-oci)
        mkdir -p "$W/ctx/$s"
        printf 'FROM debian-local:bookworm\nRUN cp -a /usr /usr2\n' > "$W/ctx/$s/Dockerfile" ;;
    aptbuild)
        mkdir -p "$W/ctx/$s"
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
    ctx50k|export1g|stages20|coldcache) ln -s "$SCEN/$s" "$W/ctx/$s" ;;
    *) echo "unknown scenario $s" >&2; exit 1 ;;
    esac
done
chown -R "$U" "$W"

cd "$W"
AS_USER=(runuser -u "$U" -- env -i HOME="/home/$U" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
names=()
for kv in $KILNS; do
    n=${kv%%=*}; bin=${kv#*=}
    cp "$bin" "$W/kiln-$n"; chmod 755 "$W/kiln-$n"
    names+=("$n")
done
DOCKER_SOCK=unix:///tmp/bench/docker/docker.sock
docker_() { DOCKER_BUILDKIT=1 /usr/bin/docker -H "$DOCKER_SOCK" "$@"; }
if command -v dockerd >/dev/null; then
    "$HERE/../../shared/bench/dockerd.sh" start >/dev/null
    docker_ import "$W/debian.tar" debian-local:bookworm >/dev/null
    names+=(buildkit)
fi

REG_PORT=
if [[ " $SCENARIOS " == *" coldcache "* ]]; then
    REG_PORT=5077
    mkdir -p "$W/registry"
    printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
        "$W/registry/data" "$REG_PORT" > "$W/registry/config.yml"
    /usr/bin/docker-registry serve "$W/registry/config.yml" >/dev/null 2>&1 &
    REG_PID=$!
    trap 'kill $REG_PID 2>/dev/null || true' EXIT
    for _ in $(seq 50); do curl -fs "http://127.0.0.1:$REG_PORT/v2/" >/dev/null && break; sleep 0.2; done
fi

TSV=$W/runs.tsv
printf 'builder\tscenario\trun\tseconds\tmax_rss_kb\n' > "$TSV"
# timed NAME BUILDER RUN cmd...: one timed command, a row in $TSV
timed() {
    local s=$1 n=$2 r=$3; shift 3
    local start end rss=0 tf=$W/time.out
    start=$(date +%s.%N)
    if [ "$n" = buildkit ]; then
        "$@" >/dev/null 2>"$W/last.err"
    else
        /usr/bin/time -f '%M' -o "$tf" "$@" >/dev/null 2>"$W/last.err"
        rss=$(tail -1 "$tf")
    fi
    end=$(date +%s.%N)
    printf '%s\t%s\t%s\t%s\t%s\n' "$n" "$s" "$r" "$(echo "$end - $start" | bc)" "$rss" >> "$TSV"
}
fresh_state() {   # a new kiln state directory holding only the base
    local st=$1 n=$2
    # the same image in every state directory (its config's time fixed), so
    # a cache made in one applies in another
    "${AS_USER[@]}" SOURCE_DATE_EPOCH=1700000000 "$W/kiln-$n" --root "$st" import \
        --tag debian-local:bookworm "$W/debian.tar" >/dev/null
    sync
}
bk_cold() {   # BuildKit without its build cache (the deletes left to age)
    docker_ builder prune -af >/dev/null 2>&1 || true
    sync; sleep 35
}

run_scenario() {
    local s=$1 n=$2 r=$3 st="$W/state-$2-$1-$3"
    local ctx="$W/ctx/$s"
    case "$n:$s" in
    buildkit:cpusr-oci|buildkit:export1g) return ;;
    buildkit:cpusr|buildkit:stages20)
        # --no-cache rebuilds; the old results stay (no deletes, see above)
        timed "$s" "$n" "$r" docker_ build -q --no-cache --network none -t "bench-$s" "$ctx" ;;
    buildkit:aptbuild)
        bk_cold   # cold, as kiln's fresh state directory is: no cache mounts
        timed "$s" "$n" "$r" docker_ build -q --no-cache --network host -t "bench-$s" "$ctx" ;;
    buildkit:ctx50k)
        bk_cold   # also drops the context BuildKit kept from the last run
        timed ctx50k "$n" "$r" docker_ build -q --network none -t "bench-$s" "$ctx"
        timed ctx50k-noop "$n" "$r" docker_ build -q --network none -t "bench-$s" "$ctx"
        touch_one "$ctx"
        timed ctx50k-touch "$n" "$r" docker_ build -q --network none -t "bench-$s" "$ctx"
        untouch_one "$ctx" ;;
    buildkit:coldcache)
        docker_ rmi -f "bench-$s" "127.0.0.1:$REG_PORT/bk-cache:latest" >/dev/null 2>&1 || true
        bk_cold
        timed "$s" "$n" "$r" docker_ build -q --network none --cache-from "127.0.0.1:$REG_PORT/bk-cache:latest" -t "bench-$s" "$ctx" ;;
    *:cpusr|*:cpusr-oci|*:aptbuild|*:stages20)
        fresh_state "$st" "$n"
        local out=(-t "bench-$s") net=(--network none)
        [ "$s" != aptbuild ] || net=(--network host --allow network.host)
        [ "$s" != cpusr-oci ] || out=(-o "type=oci,dest=$st.oci.tar")
        timed "$s" "$n" "$r" "${AS_USER[@]}" "$W/kiln-$n" --root "$st" build --no-cache --progress quiet "${net[@]}" "${out[@]}" "$ctx" ;;
    *:ctx50k)
        fresh_state "$st" "$n"
        local b=("${AS_USER[@]}" "$W/kiln-$n" --root "$st" build --progress plain --network none -t "bench-$s")
        timed ctx50k "$n" "$r" "${b[@]}" "$ctx"
        timed ctx50k-noop "$n" "$r" "${b[@]}" "$ctx"
        touch_one "$ctx"
        timed ctx50k-touch "$n" "$r" "${b[@]}" "$ctx"
        untouch_one "$ctx"
        # where the time went, from the progress lines
        "${b[@]}" --no-cache "$ctx" 2>&1 >/dev/null | grep -E '^#1 (list|checksum|copy|layer diff)' \
            | sed "s/^/  [$n run $r no-cache] /" >> "$W/phases.txt" || true ;;
    *:export1g)
        for c in gzip zstd; do
            fresh_state "$st-$c" "$n"
            timed "export1g-$c" "$n" "$r" "${AS_USER[@]}" "$W/kiln-$n" --root "$st-$c" build --progress plain --network none \
                -o "type=oci,dest=$st-$c.oci.tar,compression=$c" "$ctx"
            # the export alone, and the layer diff of the 1 GiB step
            grep -E '^(exported|#1 layer diff)' "$W/last.err" | sed "s/^/  [$n run $r $c] /" >> "$W/phases.txt" || true
            # 5 GB a run: not kept (the builds that follow make few files,
            # so the deletes cost them little)
            rm -rf "$st-$c" "$st-$c.oci.tar"
        done ;;
    *:coldcache)
        fresh_state "$st" "$n"
        timed "$s" "$n" "$r" "${AS_USER[@]}" "$W/kiln-$n" --insecure-registry "127.0.0.1:$REG_PORT" --root "$st" build --progress quiet \
            --cache-from "type=registry,ref=127.0.0.1:$REG_PORT/kiln-cache:latest" -t "bench-$s" "$ctx" ;;
    esac
}

touch_one() { cp "$1/pkg00/m0/f00000.rs" "$W/f00000.rs.orig"; echo "// changed $(date +%s%N)" >> "$1/pkg00/m0/f00000.rs"; }
untouch_one() { cp "$W/f00000.rs.orig" "$1/pkg00/m0/f00000.rs"; touch -d @1700000000 "$1/pkg00/m0/f00000.rs"; }

if [ -n "$REG_PORT" ]; then
    # the caches every cold run imports, made once, untimed
    first=${names[0]}
    fresh_state "$W/state-seed" "$first"
    "${AS_USER[@]}" "$W/kiln-$first" --insecure-registry "127.0.0.1:$REG_PORT" --root "$W/state-seed" build --progress quiet \
        --cache-to "type=registry,ref=127.0.0.1:$REG_PORT/kiln-cache:latest,mode=max" "$W/ctx/coldcache" >/dev/null
    if [[ " ${names[*]} " == *" buildkit "* ]]; then
        docker_ build -q --network none --build-arg BUILDKIT_INLINE_CACHE=1 \
            -t "127.0.0.1:$REG_PORT/bk-cache:latest" "$W/ctx/coldcache" >/dev/null
        docker_ push "127.0.0.1:$REG_PORT/bk-cache:latest" >/dev/null
    fi
fi

for s in $SCENARIOS; do
    for r in $(seq 1 "$RUNS"); do
        for n in "${names[@]}"; do
            run_scenario "$s" "$n" "$r"
        done
    done
done

if [[ " $SCENARIOS " == *" export1g "* ]]; then
    # the compressors kiln is measured against, on a tar of the same mix
    d=$W/export1g-data; mkdir -p "$d"
    head -c 536870912 /dev/urandom > "$d/random.bin"
    { seq 1 100000000 || true; } | head -c 536870912 > "$d/text.txt"
    tar -C "$d" -cf "$W/export1g.tar" .
    for cmd in "pigz -p 2 -6" "zstd -q -T2 -3"; do
        start=$(date +%s.%N); $cmd < "$W/export1g.tar" > /dev/null; end=$(date +%s.%N)
        echo "  [$cmd] 1 GiB tar in $(echo "$end - $start" | bc) s" >> "$W/phases.txt"
    done
fi

median() { sort -n | awk '{a[NR]=$1} END {if (!NR) exit; print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
col() { awk -F'\t' -v b="$1" -v s="$2" -v c="$3" '$1==b && $2==s {print $c}' "$TSV"; }
printf '%-14s' scenario; for n in "${names[@]}"; do printf ' %16s' "$n"; done
for n in "${names[@]}"; do [ "$n" = buildkit ] || printf ' %12s' "rss-$n"; done; echo
for s in $(awk -F'\t' 'NR>1 {print $2}' "$TSV" | awk '!seen[$0]++'); do
    printf '%-14s' "$s"
    first=
    for n in "${names[@]}"; do
        m=$(col "$n" "$s" 4 | median)
        if [ -z "$m" ]; then printf ' %16s' '-'; continue; fi
        [ -n "$first" ] || first=$m
        printf ' %7.2f (%5.2fx)' "$m" "$(echo "$m / $first" | bc -l)"
    done
    for n in "${names[@]}"; do
        [ "$n" = buildkit ] || printf ' %9s MB' "$(col "$n" "$s" 5 | sort -n | tail -1 | awk '{printf "%d", $1/1024}')"
    done
    echo
done
[ ! -f "$W/phases.txt" ] || { echo; echo "progress lines:"; cat "$W/phases.txt"; }
