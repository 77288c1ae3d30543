#!/usr/bin/env bash
# Writes the Dockerfiles and build contexts of kiln's larger benchmark
# scenarios into DIR/NAME, deterministically, so that any builder can run
# them (bench/real-workloads.sh runs kiln and BuildKit; for buildah or
# ../shared/bench/run-peers.sh, copy DIR/NAME to its scenarios/ directory
# and tag the base there as BASE).
#
#   bench/gen-scenarios.sh DIR [BASE] [NAMES...]
#     BASE   the FROM image (default debian-local:bookworm; any image with
#            a POSIX shell, head, cat, cp and seq works)
#     NAMES  any of ctx50k export1g stages20 coldcache (default all)
#
# ctx50k     a generated monorepo: 50,000 files, about 600 MB, COPY . /src
#            and a RUN that reads a few of them. 49,940 text sources of
#            1-8 KiB in a tree up to 12 directories deep, 60 binaries of
#            about 6 MiB of random bytes. Same bytes on every run (seeded),
#            and every file's mtime set to a fixed time.
# export1g   one RUN writing 1 GiB: 512 MiB from /dev/urandom, 512 MiB of
#            text (seq); the build is then exported as an OCI archive
# stages20   20 stages: one root, 9 that fan out from it, 9 that fan in
#            (each copies from two of the fan-out stages) and a final stage
#            copying from all 9; each stage one short RUN
# coldcache  three RUN steps of 200 MiB each (half random, half text) and
#            a small one: a 600 MB cache to import into a cold builder
set -euo pipefail
DIR=${1:?usage: gen-scenarios.sh DIR [BASE] [NAMES...]}
BASE=${2:-debian-local:bookworm}
shift 2 || shift $#
NAMES=${*:-ctx50k export1g stages20 coldcache}
mkdir -p "$DIR"

for n in $NAMES; do
    d=$DIR/$n
    case $n in
    ctx50k)
        if [ ! -f "$d/.complete" ]; then
            rm -rf "$d"; mkdir -p "$d"
            python3 - "$d" <<'PY'
import os, random, sys
root = sys.argv[1]
rng = random.Random(50000)
words = ("fn let mut struct impl return match if else for while use mod pub "
         "self Some None Ok Err Vec String u64 i32 bool true false where").split()
FILES, BINARIES = 50_000, 60
paths = []
for i in range(FILES - BINARIES - 2):  # 2: Dockerfile and README.md
    d = i // 20                        # 20 files a directory
    depth = 2 + (d % 11)               # 2..12 levels
    parts = [f"pkg{d % 37:02d}"] + [f"m{(d // 37 // 3**k) % 3}" for k in range(depth - 1)]
    paths.append(os.path.join(*parts, f"f{i:05d}.rs"))
for p in paths:
    full = os.path.join(root, p)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    size = rng.randint(1024, 8192)
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + ";\n"
        out.append(line); n += len(line)
    with open(full, "w") as f:
        f.write("".join(out)[:size])
os.makedirs(os.path.join(root, "bin"), exist_ok=True)
for i in range(BINARIES):
    with open(os.path.join(root, "bin", f"tool{i:02d}.bin"), "wb") as f:
        f.write(rng.randbytes(6 * 1024 * 1024 + rng.randint(0, 1 << 20)))
with open(os.path.join(root, "README.md"), "w") as f:
    f.write("a generated monorepo\n")
PY
            printf '.complete\n' > "$d/.dockerignore"
            find "$d" -exec touch -h -d @1700000000 {} +
            touch "$d/.complete"
        fi
        printf 'FROM %s\nCOPY . /src\nRUN cat /src/README.md /src/pkg00/m0/f00000.rs /src/bin/tool00.bin > /dev/null && ls /src | wc -l\n' "$BASE" > "$d/Dockerfile"
        touch -d @1700000000 "$d/Dockerfile" "$d" ;;
    export1g)
        mkdir -p "$d"
        printf 'FROM %s\nRUN head -c 536870912 /dev/urandom > /random.bin && seq 1 100000000 | head -c 536870912 > /text.txt\n' "$BASE" > "$d/Dockerfile" ;;
    stages20)
        mkdir -p "$d"
        {
            printf 'FROM %s AS root\nRUN echo root > /root.txt\n' "$BASE"
            for i in $(seq 1 9); do
                printf 'FROM root AS out%d\nRUN echo %d > /out%d.txt\n' "$i" "$i" "$i"
            done
            for i in $(seq 1 9); do
                j=$(( i % 9 + 1 ))
                printf 'FROM %s AS in%d\nCOPY --from=out%d /out%d.txt /\nCOPY --from=out%d /out%d.txt /\nRUN cat /out%d.txt /out%d.txt > /in%d.txt\n' \
                    "$BASE" "$i" "$i" "$i" "$j" "$j" "$i" "$j" "$i"
            done
            printf 'FROM %s\n' "$BASE"
            for i in $(seq 1 9); do printf 'COPY --from=in%d /in%d.txt /\n' "$i" "$i"; done
            printf 'RUN cat /in*.txt | wc -l\n'
        } > "$d/Dockerfile" ;;
    coldcache)
        mkdir -p "$d"
        {
            printf 'FROM %s\n' "$BASE"
            for i in 1 2 3; do
                printf 'RUN head -c 104857600 /dev/urandom > /random%d.bin && seq %d 100000000 | head -c 104857600 > /text%d.txt\n' "$i" "$i" "$i"
            done
            printf 'RUN ls -l / > /listing.txt\n'
        } > "$d/Dockerfile" ;;
    *) echo "unknown scenario $n" >&2; exit 1 ;;
    esac
done
