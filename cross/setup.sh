#!/usr/bin/env bash
# Installs what building for aarch64 and running its tests under qemu-user needs (Debian/Ubuntu,
# as root): the Rust target, the cross linker with arm64 glibc headers, and qemu-user.
set -euo pipefail
rustup target add aarch64-unknown-linux-gnu
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null
fi
# linker and qemu runner for the target come from .cargo/config.toml
aarch64-linux-gnu-gcc --version | head -1
qemu-aarch64 --version | head -1
