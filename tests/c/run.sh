#!/usr/bin/env bash
# Runs tests/c/test_capi.c against the C library as `cargo test` builds it (the same package
# selection, so nothing is compiled again): linked to the shared library, to the static one,
# under AddressSanitizer + UndefinedBehaviorSanitizer (clang's, gcc's when clang is missing), and
# under valgrind memcheck (no error, nothing definitely lost); checks the exported symbols; installs
# the library into a prefix with capi/install.sh and builds examples/c against it with pkg-config.
# With TARGET=aarch64-unknown-linux-gnu it cross-compiles the test and runs it under qemu-aarch64
# for each CPU in QEMU_CPUS (no sanitizers there). KEEP_TMP=1 keeps the temporary directory.
#   bash tests/c/run.sh            # native, after `cargo test`
#   TARGET=aarch64-unknown-linux-gnu QEMU_CPUS="cortex-a72 cortex-a76" bash tests/c/run.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
TARGET=${TARGET:-}
tmp=$(mktemp -d)
trap '[ -n "${KEEP_TMP:-}" ] || rm -rf "$tmp"' EXIT

# where cargo put libmoe_edge.so and libmoe_edge.a (cargo test leaves them in deps/)
lib=$(cargo test --locked --no-run ${TARGET:+--target "$TARGET"} --message-format=json 2>/dev/null | python3 -c '
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "moe_edge" \
            and "cdylib" in m["target"]["kind"] and not m["profile"]["test"]:
        print(os.path.dirname([f for f in m["filenames"] if f.endswith(".so")][0]))
        break
')
[ -n "$lib" ] && [ -f "$lib/libmoe_edge.so" ] && [ -f "$lib/libmoe_edge.a" ] || {
  echo "error: libmoe_edge.so/.a not found in cargo's build" >&2
  exit 1
}
# the reference: the Rust API's greedy texts through the CLI of the same build and architecture
if [ -z "$TARGET" ]; then
  moe_edge=(target/debug/moe-edge)
else
  moe_edge=(qemu-aarch64 -L /usr/aarch64-linux-gnu "target/$TARGET/debug/moe-edge")
fi
[ -x "${moe_edge[-1]}" ] || { echo "error: ${moe_edge[-1]} is not built (run cargo test first)" >&2; exit 1; }
"${moe_edge[@]}" pack models/tiny-mixtral -o "$tmp/pack" >/dev/null
mkdir "$tmp/chat" "$tmp/damaged"
cp models/tiny-mixtral/model.onnx models/tiny-mixtral/config.json tests/fixtures/chat/tokenizer.json "$tmp/chat/"
cp tests/fixtures/chat/chatml.jinja "$tmp/chat/chat_template.jinja"
echo '{"eos_token": "<|im_end|>", "bos_token": null}' >"$tmp/chat/tokenizer_config.json"
cp "$tmp/pack"/* "$tmp/damaged/"
truncate -s -100 "$tmp/damaged/experts.bin"
for m in models/tiny-mixtral "$tmp/pack"; do
  "${moe_edge[@]}" generate -m "$m" --prompt "t10 t20 t30" --max-tokens 16 --expert-cache-mb 0 --json 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["text"])'
done >"$tmp/expected.txt"
sed -n 1p "$tmp/expected.txt" >"$tmp/expected_tiny.txt"
sed -n 2p "$tmp/expected.txt" >"$tmp/expected_pack.txt"
args=(models/tiny-mixtral "$tmp/pack" "$tmp/chat" "$tmp/damaged" "$tmp/expected_tiny.txt" "$tmp/expected_pack.txt")
CFLAGS=(-std=c11 -Wall -Wextra -Werror -g -I capi/include)

if [ -n "$TARGET" ]; then
  aarch64-linux-gnu-gcc "${CFLAGS[@]}" tests/c/test_capi.c -L "$lib" -lmoe_edge -lpthread -o "$tmp/test_shared"
  for cpu in ${QEMU_CPUS:-cortex-a72}; do
    echo "=== C API under qemu-aarch64 -cpu $cpu"
    QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH="$lib" "$tmp/test_shared" "${args[@]}"
  done
  exit 0
fi

echo "=== shared library"
gcc "${CFLAGS[@]}" tests/c/test_capi.c -L "$lib" -lmoe_edge -lpthread -o "$tmp/test_shared"
LD_LIBRARY_PATH=$lib "$tmp/test_shared" "${args[@]}"
echo "=== static library"
gcc "${CFLAGS[@]}" tests/c/test_capi.c "$lib/libmoe_edge.a" -Wl,-z,noexecstack -lpthread -ldl -lm -o "$tmp/test_static"
"$tmp/test_static" "${args[@]}"
cc=clang
command -v clang >/dev/null || cc=gcc
echo "=== AddressSanitizer + UndefinedBehaviorSanitizer ($cc)"
"$cc" "${CFLAGS[@]}" -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
  tests/c/test_capi.c -L "$lib" -lmoe_edge -lpthread -o "$tmp/test_asan"
LD_LIBRARY_PATH=$lib ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
  "$tmp/test_asan" "${args[@]}"
echo "=== valgrind memcheck"
LD_LIBRARY_PATH=$lib valgrind --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite \
  "$tmp/test_shared" "${args[@]}" 2>"$tmp/valgrind.log" || { cat "$tmp/valgrind.log"; exit 1; }
grep -E "ERROR SUMMARY|definitely lost" "$tmp/valgrind.log" || true
grep -qE "definitely lost: [1-9]" "$tmp/valgrind.log" && { cat "$tmp/valgrind.log"; exit 1; }
echo "=== exported symbols"
exported=$(nm -D --defined-only "$lib/libmoe_edge.so" | awk '{print $3}')
others=$(echo "$exported" | grep -v '^moe_edge_' || true)
[ -z "$others" ] || { echo "error: symbols other than moe_edge_*: $others" >&2; exit 1; }
# every function the header declares is exported, and nothing else
declared=$(grep -oE '\bmoe_edge_[a-z_]+\(' capi/include/moe_edge.h | tr -d '(' | sort -u)
[ "$declared" = "$(echo "$exported" | sort -u)" ] || {
  echo "error: the header declares and the library exports different functions:" >&2
  diff <(echo "$declared") <(echo "$exported" | sort -u) >&2
  exit 1
}
echo "the library exports exactly the header's $(echo "$declared" | wc -l) moe_edge_* functions"
echo "=== install into a prefix, examples built with pkg-config"
mkdir -p "$tmp/lib"
cp "$lib/libmoe_edge.so" "$lib/libmoe_edge.a" "$tmp/lib/"
PROFILE=debug NO_BUILD=1 LIB_DIR="$tmp/lib" bash capi/install.sh "$tmp/prefix" >/dev/null
export PKG_CONFIG_PATH=$tmp/prefix/lib/pkgconfig
cp -r examples/c "$tmp/examples"
make -s -C "$tmp/examples" CFLAGS="-O1 -Wall -Wextra -Werror"
"$tmp/examples/header_check"
out=$("$tmp/examples/generate" models/tiny-mixtral "t10 t20 t30" 16 2>/dev/null)
[ "$out" = "t10 t20 t30$(cat "$tmp/expected_tiny.txt")" ] || {
  echo "error: examples/c/generate printed '$out'" >&2
  exit 1
}
reply=$(printf 'What does tar do?\nAnd gzip?\n' | "$tmp/examples/chat" "$tmp/chat" "Be brief.")
[ "$(grep -c 'new prompt tokens' <<<"$reply")" = 2 ] || { echo "error: examples/c/chat printed: $reply" >&2; exit 1; }
make -s -C "$tmp/examples" clean
make -s -C "$tmp/examples" STATIC=1 CFLAGS="-O1 -Wall -Wextra -Werror" generate
[ "$("$tmp/examples/generate" models/tiny-mixtral "t10 t20 t30" 16 2>/dev/null)" = "$out" ] || {
  echo "error: examples/c/generate linked statically differs" >&2
  exit 1
}
ldd "$tmp/examples/generate" | grep -q moe_edge && { echo "error: the static build links libmoe_edge.so" >&2; exit 1; }
readelf -lW "$tmp/examples/generate" | grep GNU_STACK | grep -q RWE && { echo "error: the static build has an executable stack" >&2; exit 1; }
echo "examples/c built against the installed prefix (shared and static) and ran"
echo "sizes: libmoe_edge.so $(stat -c %s "$lib/libmoe_edge.so") bytes, libmoe_edge.a $(stat -c %s "$lib/libmoe_edge.a") bytes (debug build)"
