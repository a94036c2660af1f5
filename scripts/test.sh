#!/usr/bin/env bash
# Build everything, run all tests (nextest runs them in parallel), then check format, lints
# and that every declared dependency is used (cargo machete).
set -euxo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --all-targets
cargo nextest run --workspace --no-fail-fast
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo machete
