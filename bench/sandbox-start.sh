#!/usr/bin/env bash
# Sandbox start cost: one `/bin/true`, spawn to exit, as an unprivileged
# user, side by side in one hyperfine run:
#   kiln sandbox                         (kiln's full step sandbox)
#   bwrap --unshare-all --ro-bind R / /bin/true
#   crun run of an equivalent rootless bundle (+ network namespace)
# and the ratios kiln/bwrap (target <= 1.5) and crun/kiln (target >= 3).
#
# Run as root: it installs the peers, creates the user kiln-bench with a
# subordinate range, and drops to it. crun refuses hybrid cgroup hosts, so
# the run happens in a private mount namespace with the cgroup2 mount at
# /sys/fs/cgroup/unified unmounted (only this process tree sees it).
#   bench/sandbox-start.sh [RUNS]     (default 300)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=${1:-300}
USER_NAME=kiln-bench
S=/tmp/kiln-bench/sandbox
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
"$HERE/../scripts/setup-host.sh" >/dev/null
KILN_RELEASE=$("$HERE/../scripts/build-release.sh")

id "$USER_NAME" >/dev/null 2>&1 || useradd -m -s /bin/sh "$USER_NAME"
for f in /etc/subuid /etc/subgid; do
    grep -q "^$USER_NAME:" "$f" || echo "$USER_NAME:400000:65536" >> "$f"
done

rm -rf "$S"; mkdir -p "$S/rootfs"/{bin,etc,proc,dev,sys,tmp} "$S/bundle" "$S/crun"
cp /bin/busybox "$S/rootfs/bin/"
ln -s busybox "$S/rootfs/bin/true"; ln -s busybox "$S/rootfs/bin/sh"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$S/rootfs/etc/passwd"
cp "$KILN_RELEASE" "$S/kiln"
U=$(id -u "$USER_NAME"); G=$(id -g "$USER_NAME")
(cd "$S/bundle" && crun spec --rootless)
jq --arg r "$S/rootfs" --argjson u "$U" --argjson g "$G" '.root = {path: $r, readonly: true}
    | .linux.uidMappings = [{containerID: 0, hostID: $u, size: 1}]
    | .linux.gidMappings = [{containerID: 0, hostID: $g, size: 1}]
    | .process.args = ["/bin/true"] | .process.terminal = false
    | .linux.namespaces |= (map(.type) | (. + ["network"]) | unique | map({type: .}))' \
    "$S/bundle/config.json" > "$S/bundle/config.json.new"
mv "$S/bundle/config.json.new" "$S/bundle/config.json"
chown -R "$USER_NAME:" "$S"
chmod 755 /tmp/kiln-bench

cat > "$S/measure.sh" <<EOF
set -e
cd $S
hyperfine -N --style basic --warmup 20 --runs $RUNS --export-json $S/results.json \\
  -n kiln  '$S/kiln sandbox --rootfs $S/rootfs -- /bin/true' \\
  -n bwrap 'bwrap --unshare-all --ro-bind $S/rootfs / /bin/true' \\
  -n crun  'crun --root $S/crun run -b $S/bundle bench'
EOF
chmod 755 "$S/measure.sh"
envs=(HOME="/home/$USER_NAME" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
if [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ] && [ "$(stat -fc %T /sys/fs/cgroup)" = tmpfs ]; then
    unshare -m --propagation private -- sh -c 'umount /sys/fs/cgroup/unified && exec "$@"' sh \
        runuser -u "$USER_NAME" -- env -i "${envs[@]}" bash "$S/measure.sh"
else
    runuser -u "$USER_NAME" -- env -i "${envs[@]}" bash "$S/measure.sh"
fi
echo
jq -r '.results | map({key: .command, value: .median}) | from_entries as $m
  | "median ms: kiln \($m.kiln*1000|.*100|round/100)  bwrap \($m.bwrap*1000|.*100|round/100)  crun \($m.crun*1000|.*100|round/100)",
    "kiln/bwrap = \($m.kiln/$m.bwrap|.*100|round/100)  (target <= 1.5)",
    "crun/kiln  = \($m.crun/$m.kiln|.*100|round/100)  (target >= 3)"' "$S/results.json"
