#!/usr/bin/env bash
# Builds the binary and the C library for distribution to the boards (aarch64-unknown-linux-gnu,
# the `dist` profile: LTO, one codegen unit, stripped, size-optimised except the hot crates),
# prints the binary's size, and
# checks that it needs no glibc newer than the oldest target: Jetson Linux 36 / Ubuntu 22.04
# (glibc 2.35); Raspberry Pi OS bookworm has 2.36.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
MAX_GLIBC=${MAX_GLIBC:-2.35}
cargo build --profile dist --locked --target "$TARGET"
BIN=target/$TARGET/dist/moe-edge
file "$BIN" 2>/dev/null || true
echo "size: $(stat -c %s "$BIN") bytes"
needed=$(aarch64-linux-gnu-objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
echo "highest glibc symbol version needed: $needed (limit $MAX_GLIBC)"
if [ "$(printf '%s\n%s\n' "$needed" "$MAX_GLIBC" | sort -V | tail -1)" != "$MAX_GLIBC" ]; then
  echo "error: $BIN needs glibc $needed, newer than $MAX_GLIBC" >&2
  exit 1
fi
echo "ok: $BIN runs on glibc >= $needed (Raspberry Pi OS bookworm 2.36, Jetson Linux 36 / Ubuntu 22.04 2.35)"
