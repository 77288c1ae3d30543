#!/usr/bin/env bash
# Compile deploy/apparmor/kiln with AppArmor 4's parser (-Q: do not load
# it into the kernel; -T: no cache), which scripts/setup-host.sh unpacks
# from Debian 13 with the glibc it needs. Fails when the parser is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
AA=/var/tmp/kiln-fixtures/apparmor4
[ -x "$AA/usr/sbin/apparmor_parser" ] || {
    echo "check-apparmor.sh: $AA/usr/sbin/apparmor_parser is missing: run scripts/setup-host.sh" >&2
    exit 1
}
# the package's config, with its pinned kernel feature set found where it
# was unpacked
conf=$(mktemp)
trap 'rm -f "$conf"' EXIT
echo "policy-features=$AA/usr/share/apparmor-features/features" > "$conf"
"$AA/usr/lib64/ld-linux-x86-64.so.2" --library-path "$AA/usr/lib/x86_64-linux-gnu" \
    "$AA/usr/sbin/apparmor_parser" -QT --config-file "$conf" \
    --base "$AA/etc/apparmor.d" -I "$AA/etc/apparmor.d" deploy/apparmor/kiln
echo "deploy/apparmor/kiln compiles with $("$AA/usr/lib64/ld-linux-x86-64.so.2" --library-path "$AA/usr/lib/x86_64-linux-gnu" "$AA/usr/sbin/apparmor_parser" --version 2>/dev/null | head -1)"
