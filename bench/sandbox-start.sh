#!/usr/bin/env bash
# Sandbox start cost: one `/bin/true`, spawn to exit, as an unprivileged
# user, side by side in one run:
#   kiln sandbox                         (kiln's full step sandbox)
#   bwrap --unshare-all --ro-bind R / /bin/true
#   crun run of an equivalent rootless bundle (+ network namespace)
# and the ratios kiln/bwrap (target <= 1.5) and crun/kiln (target >= 3).
#
# The runs are interleaved: ROUNDS rounds, each timing every command
# RUNS/ROUNDS times with hyperfine, the order rotated from round to round.
# Every sandbox leaves a network namespace that the kernel tears down
# later on a worker thread, and that backlog (and whatever else the host
# does) drifts over a minute; in one long block per command, whichever ran
# last paid for it (the same binary was seen at 3.8 ms and 4.7 ms in
# consecutive blocks). Medians are over all runs of a command; the ratios
# of each round show the spread.
#
# Run as root: it installs the peers, creates the user kiln-bench with a
# subordinate range, and drops to it. crun refuses hybrid cgroup hosts, so
# the run happens in a private mount namespace with the cgroup2 mount at
# /sys/fs/cgroup/unified unmounted (only this process tree sees it).
#   bench/sandbox-start.sh [RUNS] [ROUNDS]     (default 300 runs, 6 rounds)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=${1:-300}
ROUNDS=${2:-6}
for n in "$RUNS" "$ROUNDS"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "RUNS and ROUNDS must be positive integers, got '$n'" >&2; exit 2; }
done
PER_ROUND=$(( (RUNS + ROUNDS - 1) / ROUNDS ))
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
names=(kiln bwrap crun)
cmds=('$S/kiln sandbox --rootfs $S/rootfs -- /bin/true'
      'bwrap --unshare-all --ro-bind $S/rootfs / /bin/true'
      'crun --root $S/crun run -b $S/bundle bench')
rm -f $S/round-*.json
for r in \$(seq 0 $((ROUNDS - 1))); do
    args=()
    for k in 0 1 2; do
        i=\$(( (k + r) % 3 ))
        args+=(-n "\${names[i]}" "\${cmds[i]}")
    done
    hyperfine -N --style none --warmup 10 --runs $PER_ROUND --export-json $S/round-\$r.json "\${args[@]}"
done
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
jq -s -r '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor]
                     else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def ms: . * 100000 | round / 100;
  def r2: . * 100 | round / 100;
  (map(.results[]) | group_by(.command)
    | map({key: .[0].command, value: (map(.times[]) | median)}) | from_entries) as $m
  | (map(.results | map({key: .command, value: .median}) | from_entries)) as $rounds
  | "median ms over \($rounds | length) rounds: kiln \($m.kiln | ms)  bwrap \($m.bwrap | ms)  crun \($m.crun | ms)",
    "kiln/bwrap = \($m.kiln / $m.bwrap | r2)  (target <= 1.5; rounds: \($rounds | map(.kiln / .bwrap | r2) | join(" ")))",
    "crun/kiln  = \($m.crun / $m.kiln | r2)  (target >= 3; rounds: \($rounds | map(.crun / .kiln | r2) | join(" ")))"
' "$S"/round-*.json
