#!/bin/sh
# Run `kiln build` in a rootless Podman container, with the least the
# outer container needs (tested in CI by vm-tests/tests/in_container.rs):
#   --security-opt seccomp=deploy/seccomp.json  Moby's default profile plus
#       the namespace and mount calls kiln's sandbox setup makes (the
#       runtimes' defaults refuse them without CAP_SYS_ADMIN); every step
#       still runs under kiln's own, narrower profile
#   --security-opt unmask=/proc/*      a step's fresh /proc is refused by
#       the kernel while the container's /proc has masked submounts
#   --device /dev/net/tun              only for --network sandbox (the
#       default): pasta's tap device
# No added capability, not --privileged. runc, because crun 1.8 refuses
# hybrid cgroup hosts.
#
# Usage: deploy/podman-run.sh ROOTFS CONTEXT [kiln build options...]
# ROOTFS holds kiln (and pasta for --network sandbox); CONTEXT is mounted
# at /work/ctx; the state directory lives in the container's /work/state.
set -eu
rootfs=$1 context=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
exec podman run --rm --runtime runc \
    --security-opt seccomp="$here/seccomp.json" \
    --security-opt unmask=/proc/* \
    --device /dev/net/tun \
    --volume "$context:/work/ctx:ro" \
    --rootfs "$rootfs" \
    /bin/kiln --root /work/state build "$@" /work/ctx
