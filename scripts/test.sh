#!/usr/bin/env bash
# kiln's whole test suite: unit, integration and end-to-end tests (the
# end-to-end ones drop to the unprivileged user kiln-test when run as root),
# then the format and lint checks CI enforces, then a short run of every
# fuzz target on its seed corpus (KILN_FUZZ_SECONDS each, default 30;
# 0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins --examples
cargo test --workspace
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
if [ "${KILN_FUZZ_SECONDS:-30}" != 0 ]; then
    scripts/fuzz.sh "${KILN_FUZZ_SECONDS:-30}"
fi
