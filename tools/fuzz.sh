#!/usr/bin/env bash
# Builds moe-edge's libFuzzer targets (fuzz/) and runs them.
#
#   tools/fuzz.sh [--seconds S | --runs N] [--jobs J] [--merge] [TARGET...]
#
# --seconds S  each target runs S seconds (default 60); --runs N: N executions instead
# --jobs J     targets run J at a time (default: the number of cores)
# --merge      afterwards, fold what each run found into fuzz/corpus/<target>/ (minimised:
#              only inputs that add coverage are kept)
# TARGET...    default: every target (pack onnx npy companions chat_template server_request capi)
#
# Each run starts from fuzz/corpus/<target>/ (read-only) and keeps what it finds in
# target/fuzz/corpus/<target>/; a crash, hang (> 10 s), or use of more than 2 GiB is written to
# target/fuzz/artifacts/<target>/ and fails the script. The executions of each target are
# printed and appended to target/fuzz/runs.tsv. CI runs it with --seconds 15; the long runs
# quoted in docs/FUZZING.md are made with it too.
#
# The build instruments moe-edge's own crates only (fuzz/rustc-sancov, as cargo's
# RUSTC_WORKSPACE_WRAPPER) and reuses every dependency the test build made, so that tract is not
# compiled again: no nightly toolchain or cargo-fuzz is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
runs=
jobs=$(nproc)
merge=0
targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --merge) merge=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=(pack onnx npy companions chat_template server_request capi)
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "no fuzz target named $t (targets: ${all[*]})" >&2; exit 2; }
done

RUSTC_WORKSPACE_WRAPPER="$PWD/fuzz/rustc-sancov" \
  cargo build --locked -p moe-edge-fuzz --features libfuzzer --bins
bin=target/debug

# the largest seed of a target bounds its inputs (a little room to grow)
max_len() {
  local largest
  largest=$(find -L "fuzz/corpus/$1" -type f -printf '%s\n' | sort -n | tail -1)
  echo $(( ${largest:-4096} + ${largest:-4096} / 4 + 4096 ))
}

run_one() {
  local t=$1 log=target/fuzz/logs/$1.log
  mkdir -p "target/fuzz/corpus/$t" "target/fuzz/artifacts/$t" target/fuzz/logs
  local limit=(-max_total_time="$seconds")
  [ -n "$runs" ] && limit=(-runs="$runs")
  local dict=()
  [ -f "fuzz/dict/$t.dict" ] && dict=(-dict="fuzz/dict/$t.dict")
  local status=0
  "$bin/$t" "${limit[@]}" "${dict[@]}" -timeout=10 -rss_limit_mb=2048 -max_len="$(max_len "$t")" \
    -print_final_stats=1 -artifact_prefix="target/fuzz/artifacts/$t/" \
    "target/fuzz/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1 || status=$?
  local done_line execs
  done_line=$(grep -E '^Done [0-9]+ runs' "$log" | tail -1 || true)
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
  if [ "$status" != 0 ]; then
    echo "$t: FAILED (exit $status); log $log; artifacts target/fuzz/artifacts/$t/" >&2
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -5 >&2 || true
    return 1
  fi
  printf '%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "${execs:-?}" "$done_line" >>target/fuzz/runs.tsv
  echo "$t: ${execs:-?} executions, 0 crashes ($done_line)"
}

# the scratch directories (moe-edge-fuzz-PID) of target processes that have ended
clean_scratch() {
  local d
  for d in /dev/shm/moe-edge-fuzz-* "${TMPDIR:-/tmp}"/moe-edge-fuzz-*; do
    [ -d "$d" ] || continue
    kill -0 "${d##*-}" 2>/dev/null || rm -rf "$d"
  done
}

mkdir -p target/fuzz
rm -f target/fuzz/failed
for t in "${targets[@]}"; do
  { run_one "$t" || echo "$t" >>target/fuzz/failed; } &
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
done
wait
failed=0
[ -s target/fuzz/failed ] && failed=1
clean_scratch

if [ "$merge" = 1 ] && [ "$failed" = 0 ]; then
  for t in "${targets[@]}"; do
    mkdir -p "target/fuzz/merged/$t"
    rm -f "target/fuzz/merged/$t"/*
    "$bin/$t" -merge=1 -timeout=10 -rss_limit_mb=2048 -max_len="$(max_len "$t")" \
      "target/fuzz/merged/$t" "fuzz/corpus/$t" "target/fuzz/corpus/$t" >"target/fuzz/logs/$t.merge.log" 2>&1
    cp -n "target/fuzz/merged/$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
    echo "$t: fuzz/corpus/$t holds $(find "fuzz/corpus/$t" -type f | wc -l) inputs"
  done
  clean_scratch
fi
exit $failed
