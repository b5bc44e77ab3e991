#!/usr/bin/env bash
# Runs the aarch64 build's tests under qemu-user for the CPUs moe-edge targets:
#   cortex-a72 (Raspberry Pi 4: NEON only), cortex-a76 (Raspberry Pi 5 / Jetson Orin: + dotprod),
#   max (newest cores: + i8mm).
# Per CPU: every kernel test, requiring the ISAs that CPU has (a missing one fails instead of
# being skipped), one end-to-end model test (KV-cache generation against torch, and an int8 pack
# with the smallest cache), and the dispatch log of `moe-edge info`.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
declare -A REQUIRED=([cortex-a72]=neon [cortex-a76]=neon,dotprod [max]=neon,dotprod,i8mm)
declare -A CHOSEN=([cortex-a72]=neon [cortex-a76]=dotprod [max]=i8mm)
cargo build --locked --target "$TARGET" --bin moe-edge
for cpu in cortex-a72 cortex-a76 max; do
  echo "=== QEMU_CPU=$cpu (requires ${REQUIRED[$cpu]})"
  export QEMU_CPU=$cpu
  MOE_EDGE_REQUIRE_ISAS=${REQUIRED[$cpu]} cargo test --locked --target "$TARGET" -p moe-edge-kernels
  cargo test --locked --target "$TARGET" --test kv_generation mixtral_hf_exporter
  cargo test --locked --target "$TARGET" --test pack smallest_cache_budget_gives_the_same_tokens
  log=$(qemu-aarch64 -L /usr/aarch64-linux-gnu target/$TARGET/debug/moe-edge -v info 2>&1)
  echo "$log" | grep -E "int8 kernels"
  echo "$log" | grep -q "int8 kernels: ${CHOSEN[$cpu]} " || { echo "error: expected ${CHOSEN[$cpu]} kernels on $cpu" >&2; exit 1; }
done
unset QEMU_CPU
echo "qemu runs passed for cortex-a72, cortex-a76, max"
