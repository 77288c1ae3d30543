#!/usr/bin/env bash
# Build kiln's release binary and print its path (target/dist/kiln).
#
# It is a static PIE: still loaded at a random address (ASLR kept), but
# with no shared libraries to map and no symbols to bind at start-up. Every
# `kiln` invocation pays that start-up once; on a 2-core VM the static
# binary starts a sandboxed /bin/true in ~4.3 ms against ~5.1 ms for the
# dynamic one (bench/sandbox-start.sh). glibc still loads NSS modules for
# user and host lookups at run time, from the host it runs on. It uses the
# `dist` profile (fat LTO, one codegen unit; see Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps the flag off build scripts and proc macros, which cannot be
# linked statically
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --profile dist --bin kiln --target "$host" >&2
mkdir -p target/dist
cp "target/$host/dist/kiln" target/dist/kiln.new
mv target/dist/kiln.new target/dist/kiln
echo "$PWD/target/dist/kiln"
