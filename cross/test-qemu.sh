#!/usr/bin/env bash
# Runs the aarch64 build's tests under qemu-user for the CPUs moe-edge targets:
#   cortex-a72 (Raspberry Pi 4: NEON only), cortex-a76 (Raspberry Pi 5 / Jetson Orin: + dotprod),
#   max (newest cores: + i8mm).
# One build: `cargo test --no-run` over the whole workspace, the same package selection as the
# native `cargo test`, so that cargo resolves one feature set and compiles tract once (building
# per package with -p resolves other feature sets and compiles it again). The test executables
# are then run directly under qemu.
# cortex-a72 (the baseline, where a stray dotprod/i8mm instruction would be SIGILL) runs every test
# of the kernels and the engine (unit and integration tests: model logits and generation against
# torch, packs, caches, chat templates); the command-line and server tests, which exercise nothing
# architecture-specific, run natively only. cortex-a76 and max run the kernel tests requiring the
# ISAs they have (a missing one fails instead of being skipped) and two end-to-end model tests
# (KV-cache generation against torch, an int8 pack with the smallest cache). Every CPU checks
# the dispatch log of `moe-edge info`. The C API's test program (tests/c/run.sh) runs on cortex-a72 and
# cortex-a76 against the aarch64 libmoe_edge.so.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
declare -A REQUIRED=([cortex-a72]=neon [cortex-a76]=neon,dotprod [max]=neon,dotprod,i8mm)
declare -A CHOSEN=([cortex-a72]=neon [cortex-a76]=dotprod [max]=i8mm)
QEMU=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
start=$SECONDS
cargo test --locked --target "$TARGET" --no-run --message-format=json-render-diagnostics >target/aarch64-tests.json
echo "aarch64 build took $((SECONDS - start)) s"
# "package-dir executable" of each test executable of a package
executables() {
  python3 - "$1" <<'PY'
import json, sys
for line in open("target/aarch64-tests.json"):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and m["target"]["name"] != "build-script-build":
        name = m["package_id"]
        if f"#{sys.argv[1]}@" in name or f"/{sys.argv[1]}#" in name or name.startswith(sys.argv[1] + " "):
            print(m["manifest_path"].rsplit("/", 1)[0], m["executable"])
PY
}
run_tests() { # package, extra test-harness arguments...
  local package=$1
  shift
  local found=0
  while read -r dir exe; do
    found=1
    echo "--- $package: $(basename "$exe") $*"
    (cd "$dir" && "${QEMU[@]}" "$exe" "$@")
  done < <(executables "$package")
  [ "$found" = 1 ] || { echo "no test executable of $package in the build" >&2; exit 1; }
}
export MOE_EDGE_TEST_RUNNER="${QEMU[*]}"
for cpu in cortex-a72 cortex-a76 max; do
  start=$SECONDS
  echo "=== QEMU_CPU=$cpu (requires ${REQUIRED[$cpu]})"
  export QEMU_CPU=$cpu
  MOE_EDGE_REQUIRE_ISAS=${REQUIRED[$cpu]} run_tests moe-edge-kernels
  if [ "$cpu" = cortex-a72 ]; then
    run_tests moe-edge-engine
  else
    run_tests moe-edge-engine session::tests::mixtral_hf_exporter pack::tests::smallest_cache_budget_gives_the_same_tokens
  fi
  echo "=== QEMU_CPU=$cpu took $((SECONDS - start)) s"
  log=$("${QEMU[@]}" target/$TARGET/debug/moe-edge -v info 2>&1)
  echo "$log" | grep -E "int8 kernels"
  echo "$log" | grep -q "int8 kernels: ${CHOSEN[$cpu]} " || { echo "error: expected ${CHOSEN[$cpu]} kernels on $cpu" >&2; exit 1; }
done
unset QEMU_CPU MOE_EDGE_TEST_RUNNER
# the C library of the same build: the C test program cross-compiled against libmoe_edge.so
start=$SECONDS
TARGET=$TARGET QEMU_CPUS="cortex-a72 cortex-a76" bash tests/c/run.sh
echo "=== C API under qemu took $((SECONDS - start)) s"
echo "qemu runs passed: kernels and engine suites on cortex-a72; kernels and end-to-end tests on cortex-a76 and max;"
echo "the C API test on cortex-a72 and cortex-a76"
