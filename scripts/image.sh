#!/usr/bin/env bash
# Build kiln's own image with kiln, from deploy/Dockerfile.
#
#   scripts/image.sh [-b KILN_BINARY] [kiln build options...]
#
# Without -b it uses the static release binary (scripts/build-release.sh).
# The context is staged in a temporary directory: the binary at /bin/kiln
# and, when it is dynamically linked, its libraries; /usr/bin/pasta and
# its libraries; /etc/ssl/certs/ca-certificates.crt from this host; a
# root-only /etc/passwd and /etc/group; empty /tmp (1777), /work, /proc,
# /sys, /dev and /dev/net. The remaining options go to `kiln build`
# (for example -t kiln:dev -o type=docker,dest=kiln.tar).
set -euo pipefail
cd "$(dirname "$0")/.."
binary=
if [ "${1:-}" = -b ]; then
    binary=$2
    shift 2
fi
[ -n "$binary" ] || binary=$(scripts/build-release.sh)
kiln=${KILN:-$binary}
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
install_with_libs() { # FILE DEST
    mkdir -p "$root$(dirname "$2")"
    cp "$1" "$root$2"
    # the libraries of a dynamic binary, at the paths the loader wants
    ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp "$lib" "$root$lib"
    done
}
install_with_libs "$binary" /bin/kiln
command -v pasta >/dev/null || { echo "pasta is missing: apt-get install passt" >&2; exit 1; }
install_with_libs "$(command -v pasta)" /usr/bin/pasta
mkdir -p "$root"/{etc/ssl/certs,tmp,work,proc,sys,dev/net}
chmod 1777 "$root/tmp"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
echo 'root:x:0:0:root:/work:/bin/kiln' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
chmod -R a+rX "$ctx"
"$kiln" build -f deploy/Dockerfile "$@" "$ctx"
