#!/usr/bin/env bash
# Runs the aarch64 build's tests under qemu-user for the CPUs moe-edge targets:
#   cortex-a72 (Raspberry Pi 4: NEON only), cortex-a76 (Raspberry Pi 5 / Jetson Orin: + dotprod),
#   max (newest cores: + i8mm).
# cortex-a72 (the baseline, where a stray dotprod/i8mm instruction would be SIGILL) runs every test
# of the kernels and the engine (unit and integration tests: model logits and generation against
# torch, packs, caches, chat templates); the command-line and server tests, which exercise nothing
# architecture-specific, run natively only. Every CPU runs the kernel tests requiring the ISAs it has (a missing one fails
# instead of being skipped), two end-to-end model tests (KV-cache generation against torch, an
# int8 pack with the smallest cache), and checks the dispatch log of `moe-edge info`.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
declare -A REQUIRED=([cortex-a72]=neon [cortex-a76]=neon,dotprod [max]=neon,dotprod,i8mm)
declare -A CHOSEN=([cortex-a72]=neon [cortex-a76]=dotprod [max]=i8mm)
start=$SECONDS
cargo build --locked --target "$TARGET" --bin moe-edge
echo "aarch64 build took $((SECONDS - start)) s"
# tests that spawn the binary need the emulator in front (no binfmt_misc here)
export MOE_EDGE_TEST_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
for cpu in cortex-a72 cortex-a76 max; do
  start=$SECONDS
  echo "=== QEMU_CPU=$cpu (requires ${REQUIRED[$cpu]})"
  export QEMU_CPU=$cpu
  if [ "$cpu" = cortex-a72 ]; then
    MOE_EDGE_REQUIRE_ISAS=${REQUIRED[$cpu]} cargo test --locked --target "$TARGET" \
      -p moe-edge-kernels -p moe-edge-engine --lib --tests
  else
    MOE_EDGE_REQUIRE_ISAS=${REQUIRED[$cpu]} cargo test --locked --target "$TARGET" -p moe-edge-kernels --lib --tests
    cargo test --locked --target "$TARGET" -p moe-edge-engine --lib session::tests::mixtral_hf_exporter
    cargo test --locked --target "$TARGET" -p moe-edge-engine --lib pack::tests::smallest_cache_budget_gives_the_same_tokens
  fi
  echo "=== QEMU_CPU=$cpu took $((SECONDS - start)) s"
  log=$(qemu-aarch64 -L /usr/aarch64-linux-gnu target/$TARGET/debug/moe-edge -v info 2>&1)
  echo "$log" | grep -E "int8 kernels"
  echo "$log" | grep -q "int8 kernels: ${CHOSEN[$cpu]} " || { echo "error: expected ${CHOSEN[$cpu]} kernels on $cpu" >&2; exit 1; }
done
unset QEMU_CPU MOE_EDGE_TEST_RUNNER
echo "qemu runs passed: kernels and engine suites on cortex-a72; kernels and end-to-end tests on cortex-a76 and max"
