#!/usr/bin/env bash
# kiln's whole test suite: unit, integration and end-to-end tests (the
# end-to-end ones drop to the unprivileged user kiln-test when run as root),
# then the format and lint checks CI enforces.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test --workspace
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
