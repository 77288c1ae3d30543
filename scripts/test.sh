#!/usr/bin/env bash
# kiln's whole test suite: unit, integration and end-to-end tests (the
# end-to-end ones drop to the unprivileged user kiln-test when run as root),
# then the format and lint checks CI enforces, then a short run of every
# fuzz target on its seed corpus (KILN_FUZZ_SECONDS each, default 30;
# 0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins --examples
# tests whose prerequisite is missing list themselves here (under CI=true
# they fail instead)
rm -f /tmp/kiln-vm-tests/skipped
cargo test --workspace
if [ -s /tmp/kiln-vm-tests/skipped ]; then
    echo "SKIPPED (missing prerequisites; not passed):" >&2
    sed 's/^/  /' /tmp/kiln-vm-tests/skipped >&2
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
python3 deploy/make-seccomp.py --check
scripts/check-apparmor.sh
if [ "${KILN_FUZZ_SECONDS:-30}" != 0 ]; then
    scripts/fuzz.sh "${KILN_FUZZ_SECONDS:-30}"
fi
