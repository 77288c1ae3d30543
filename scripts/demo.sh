#!/usr/bin/env bash
# Build kiln, then build a small image with it as an unprivileged user and
# run the result in kiln's sandbox: a busybox root filesystem from Debian's
# busybox-static as the base, two stages built in parallel, cached rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
kiln_bin=$(scripts/build-release.sh)
[ -x /bin/busybox ] || { echo "demo: install busybox-static (scripts/setup-host.sh)" >&2; exit 1; }

work=$(mktemp -d /tmp/kiln-demo.XXXXXX)
chmod 755 "$work"
ctx=$work/ctx
mkdir -p "$ctx/rootfs"/{bin,etc,proc,dev,sys,tmp,root}
cp /bin/busybox "$ctx/rootfs/bin/"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$ctx/rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n' > "$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nuser:x:1000:\n' > "$ctx/rootfs/etc/group"
chmod 1777 "$ctx/rootfs/tmp"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch AS base
COPY rootfs/ /

FROM base AS left
RUN echo "left stage ran as uid $(id -u) in its own network namespace: $(ls /sys/class/net | tr "\n" " ")" > /left

FROM base AS right
RUN echo "right stage: $(grep NoNewPrivs /proc/self/status)" > /right

FROM base
COPY --from=left /left /report/
COPY --from=right /right /report/
WORKDIR /report
CMD ["sh", "-c", "cat /report/*"]
DOCKERFILE
cp "$kiln_bin" "$work/kiln"

as_user() {
    if [ "$(id -u)" = 0 ]; then
        # kiln never runs a step as real root; show it as a normal user.
        id kiln-test >/dev/null 2>&1 || useradd -m -s /bin/sh kiln-test
        grep -q '^kiln-test:' /etc/subuid || echo "kiln-test:300000:65536" >> /etc/subuid
        grep -q '^kiln-test:' /etc/subgid || echo "kiln-test:300000:65536" >> /etc/subgid
        chown -R kiln-test: "$work"
        setpriv --reuid kiln-test --regid kiln-test --init-groups --reset-env -- "$@"
    else
        "$@"
    fi
}

echo "== kiln build (first time)"
as_user "$work/kiln" --root "$work/state" build --progress plain -t demo -o "type=local,dest=$work/out" "$ctx"
echo "== kiln build (again: everything cached)"
as_user "$work/kiln" --root "$work/state" build --progress plain -t demo "$ctx"
as_user "$work/kiln" --root "$work/state" images
echo "== the image's CMD, run in kiln's sandbox"
as_user "$work/kiln" sandbox --rootfs "$work/out" --cwd /report -- sh -c 'cat /report/*'
rm -rf "$work" 2>/dev/null || true
