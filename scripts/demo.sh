#!/usr/bin/env bash
# Build kiln and show what a build step's sandbox looks like from inside:
# a busybox root filesystem, run as an unprivileged user.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin kiln
KILN=$PWD/target/release/kiln
[ -x /bin/busybox ] || { echo "demo: install busybox-static (scripts/setup-host.sh)" >&2; exit 1; }

work=$(mktemp -d /tmp/kiln-demo.XXXXXX)
chmod 755 "$work"
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,etc,proc,dev,sys,tmp,root}
cp /bin/busybox "$rootfs/bin/"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\n' > "$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
cp "$KILN" "$work/kiln"

script='echo "inside:  uid $(id -u), hostname $(hostname), pid $$"
echo "uid_map: $(cat /proc/self/uid_map | tr -s " " | head -1)"
grep -E "^(NoNewPrivs|Seccomp|CapEff)" /proc/self/status
echo "network: $(ls /sys/class/net 2>/dev/null || cat /proc/net/dev | tail -n +3 | cut -d: -f1)"
mount -t tmpfs none /mnt 2>&1 | sed "s/^/mount:   /"
echo "done"'

run() { "$work/kiln" sandbox --rootfs "$rootfs" -- /bin/sh -c "$script"; }
if [ "$(id -u)" = 0 ]; then
    # kiln never runs a step as real root; show it as a normal user when we can.
    if id kiln-test >/dev/null 2>&1 || useradd -m -s /bin/sh kiln-test 2>/dev/null; then
        grep -q '^kiln-test:' /etc/subuid || echo "kiln-test:300000:65536" >> /etc/subuid
        grep -q '^kiln-test:' /etc/subgid || echo "kiln-test:300000:65536" >> /etc/subgid
        chown -R kiln-test: "$rootfs"
        echo "outside: running as kiln-test (uid $(id -u kiln-test))"
        setpriv --reuid kiln-test --regid kiln-test --init-groups --reset-env -- \
            "$work/kiln" sandbox --rootfs "$rootfs" -- /bin/sh -c "$script"
    else
        run
    fi
else
    echo "outside: uid $(id -u)"
    run
fi
rm -rf "$work" 2>/dev/null || true
