#!/usr/bin/env bash
# The cost of the default network per step: `kiln sandbox --network sandbox
# -- /bin/true` against `--network none`, with pasta and with slirp4netns,
# as an unprivileged user, and the ratios sandbox/none. With BEFORE=path to
# another kiln binary, the same runs for it, interleaved, so a change to the
# network setup is measured against the code before it in one run.
#
# The runs are interleaved: ROUNDS rounds, each timing every command
# RUNS/ROUNDS times with hyperfine, the order rotated from round to round
# (network namespaces are torn down by the kernel after the step, and that
# backlog drifts; see sandbox-start.sh). Medians are over all runs.
#
# Run as root: it installs what it needs, creates the user kiln-bench with
# a subordinate range, and drops to it.
#   KILN=path/to/kiln [BEFORE=path/to/old/kiln] bench/network-cost.sh [RUNS] [ROUNDS]
# (default: the release build of this tree, 120 runs, 4 rounds)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=${1:-120}
ROUNDS=${2:-4}
for n in "$RUNS" "$ROUNDS"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "RUNS and ROUNDS must be positive integers, got '$n'" >&2; exit 2; }
done
PER_ROUND=$(( (RUNS + ROUNDS - 1) / ROUNDS ))
USER_NAME=kiln-bench
S=/tmp/kiln-bench/network
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
"$HERE/../scripts/setup-host.sh" >/dev/null
KILN=${KILN:-$("$HERE/../scripts/build-release.sh")}

id "$USER_NAME" >/dev/null 2>&1 || useradd -m -s /bin/sh "$USER_NAME"
for f in /etc/subuid /etc/subgid; do
    grep -q "^$USER_NAME:" "$f" || echo "$USER_NAME:400000:65536" >> "$f"
done

rm -rf "$S"; mkdir -p "$S/rootfs"/{bin,etc,proc,dev,sys,tmp}
cp /bin/busybox "$S/rootfs/bin/"
ln -s busybox "$S/rootfs/bin/true"; ln -s busybox "$S/rootfs/bin/sh"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$S/rootfs/etc/passwd"
cp "$KILN" "$S/kiln"
versions=(kiln)
if [ -n "${BEFORE:-}" ]; then
    cp "$BEFORE" "$S/before"
    versions+=(before)
fi
chown -R "$USER_NAME:" "$S"
chmod 755 /tmp/kiln-bench

names=(); cmds=()
for v in "${versions[@]}"; do
    names+=("$v-none"); cmds+=("$S/$v sandbox --rootfs $S/rootfs --network none -- /bin/true")
    for stack in pasta slirp4netns; do
        names+=("$v-$stack")
        cmds+=("env KILN_NETWORK_STACK=$stack $S/$v sandbox --rootfs $S/rootfs --network sandbox -- /bin/true")
    done
done
{
    echo "set -e"
    printf 'names=('; printf "'%s' " "${names[@]}"; echo ')'
    printf 'cmds=('; printf "'%s' " "${cmds[@]}"; echo ')'
    cat <<EOF
n=\${#names[@]}
rm -f $S/round-*.json
for r in \$(seq 0 $((ROUNDS - 1))); do
    args=()
    for k in \$(seq 0 \$((n - 1))); do
        i=\$(( (k + r) % n ))
        args+=(-n "\${names[i]}" "\${cmds[i]}")
    done
    hyperfine -N --style none --warmup 5 --runs $PER_ROUND --export-json $S/round-\$r.json "\${args[@]}"
done
EOF
} > "$S/measure.sh"
chmod 755 "$S/measure.sh"
runuser -u "$USER_NAME" -- env -i HOME="/home/$USER_NAME" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin bash "$S/measure.sh"
echo
jq -s -r --argjson versions "$(printf '%s\n' "${versions[@]}" | jq -R . | jq -s .)" '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor]
                     else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def ms: . * 100000 | round / 100;
  def r2: . * 100 | round / 100;
  (map(.results[]) | group_by(.command)
    | map({key: .[0].command, value: (map(.times[]) | median)}) | from_entries) as $m
  | $versions[] as $v
  | "\($v): none \($m["\($v)-none"] | ms) ms, pasta \($m["\($v)-pasta"] | ms) ms (sandbox/none \($m["\($v)-pasta"] / $m["\($v)-none"] | r2)), slirp4netns \($m["\($v)-slirp4netns"] | ms) ms (sandbox/none \($m["\($v)-slirp4netns"] / $m["\($v)-none"] | r2))"
' "$S"/round-*.json
