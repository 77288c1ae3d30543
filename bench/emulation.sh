#!/usr/bin/env bash
# Cost of emulation, as an unprivileged user, with hyperfine:
#  1. setup: `kiln sandbox` of a native /bin/true with and without
#     `--platform linux/arm64` (which mounts the step's own binfmt_misc and
#     registers qemu-aarch64-static but never runs it): the difference is
#     the emulation setup per step (target < 5 ms);
#  2. work: the same small shell loop in an arm64 busybox under qemu-user
#     against the amd64 busybox natively, reported as a ratio.
#   bench/emulation.sh [RUNS]     (default 100; run as root)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=${1:-100}
USER_NAME=kiln-bench
S=/tmp/kiln-bench/emulation
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
"$HERE/../scripts/setup-host.sh" >/dev/null
KILN_RELEASE=$("$HERE/../scripts/build-release.sh")
id "$USER_NAME" >/dev/null 2>&1 || useradd -m -s /bin/sh "$USER_NAME"
for f in /etc/subuid /etc/subgid; do
    grep -q "^$USER_NAME:" "$f" || echo "$USER_NAME:400000:65536" >> "$f"
done
rm -rf "$S"; mkdir -p "$S"/{amd,arm,x}/{bin,etc,proc,dev,sys,tmp}
cp /bin/busybox "$S/amd/bin/"
dpkg-deb -x /var/tmp/kiln-fixtures/busybox-static_*_arm64.deb "$S/x"
cp "$S/x/bin/busybox" "$S/arm/bin/"
for r in amd arm; do for l in sh true; do ln -s busybox "$S/$r/bin/$l"; done; done
install -m 755 "$KILN_RELEASE" "$S/kiln"
chmod -R a+rX "$S"
install -d -o "$USER_NAME" "$S/results"
# the script lives in each rootfs: no quoting through su and hyperfine
for r in amd arm; do
    printf 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done\n' > "$S/$r/loop.sh"
done
K="$S/kiln sandbox"
su "$USER_NAME" -c "hyperfine -N -w 5 -r $RUNS --export-json $S/results/setup.json \
    '$K --rootfs $S/amd -- /bin/true' \
    '$K --rootfs $S/amd --platform linux/arm64 -- /bin/true'"
su "$USER_NAME" -c "hyperfine -N -w 2 -r 20 --export-json $S/results/work.json \
    '$K --rootfs $S/amd -- /bin/sh /loop.sh' \
    '$K --rootfs $S/arm --platform linux/arm64 -- /bin/sh /loop.sh'"
python3 - "$S" <<'PY'
import json, sys
s = sys.argv[1]
m = lambda f: [r["mean"] for r in json.load(open(f"{s}/results/{f}"))["results"]]
(plain, emu) = m("setup.json")
(native, emulated) = m("work.json")
print(f"emulation setup per step: {(emu - plain) * 1000:.2f} ms (target < 5 ms)")
print(f"emulated/native on the same script: {emulated / native:.1f}x "
      f"({emulated * 1000:.0f} ms vs {native * 1000:.0f} ms, sandbox start included)")
PY
