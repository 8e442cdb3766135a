#!/usr/bin/env bash
# Builds the libFuzzer targets with clang-14 and AddressSanitizer in their own build directory and
# runs each for a bounded time on a scratch copy of its corpus (the repository's corpus is never
# modified). Exits non-zero when a fuzzer finds a crash, a sanitizer report, a leak, a timeout or
# an out-of-memory, and prints where the offending input was saved.
#
#   tests/fuzz/run.sh [FUZZER...]   (default: every fuzzer below whose source exists)
#
# Environment:
#   FUZZ_BUILD_DIR     build directory, relative to the repository root (build-fuzz)
#   FUZZ_SECONDS       fuzzing time per fuzzer, corpus loading included (20)
#   FUZZ_TIMEOUT       seconds one input may take before it counts as a hang (10)
#   FUZZ_RSS_LIMIT_MB  memory limit of a fuzzer process (2048)
#   ASAN_OPTIONS       appended to the defaults below, so it can override them
#
# A saved input replays with `<build>/tests/fuzz/<fuzzer> <file>`; copied into the fuzzer's
# corpus directory it becomes a regression test of the normal build (ctest -R fuzz).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

build_dir=${FUZZ_BUILD_DIR:-build-fuzz}
seconds=${FUZZ_SECONDS:-20}
timeout=${FUZZ_TIMEOUT:-10}
rss_limit_mb=${FUZZ_RSS_LIMIT_MB:-2048}

# fuzzer → source, corpus
declare -A sources=(
  [path_template_fuzz]=tests/fuzz/path_template_fuzz.cc
  [transcoder_fuzz]=tests/fuzz/transcoder_fuzz.cc
)
declare -A corpora=(
  [path_template_fuzz]=tests/fuzz/corpus/path_template
  [transcoder_fuzz]=tests/fuzz/corpus/transcoder
)
all=(path_template_fuzz transcoder_fuzz)

requested=("$@")
if [[ ${#requested[@]} -eq 0 ]]; then requested=("${all[@]}"); fi
fuzzers=()
for fuzzer in "${requested[@]}"; do
  if [[ -z ${sources[$fuzzer]+set} ]]; then
    echo "run.sh: unknown fuzzer '$fuzzer' (known: ${all[*]})" >&2
    exit 2
  fi
  if [[ ! -f ${sources[$fuzzer]} ]]; then
    echo "run.sh: $fuzzer: ${sources[$fuzzer]} is missing" >&2
    exit 2
  fi
  fuzzers+=("$fuzzer")
done

# -O1 -g as libFuzzer recommends; Debug adds no optimisation of its own and keeps assert() on.
flags="-fsanitize=address,fuzzer-no-link -g -O1"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" -DMONTAGE_FUZZ=ON >/dev/null
cmake --build "$build_dir" --target "${fuzzers[@]}"

# Leak detection stays on: a leak per request is a real bug in a gateway.
export ASAN_OPTIONS="detect_leaks=1:check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1:strict_string_checks=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/montage-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

failed=()
for fuzzer in "${fuzzers[@]}"; do
  binary="$root/$build_dir/tests/fuzz/$fuzzer"
  corpus="$scratch/$fuzzer"
  artifacts="$root/$build_dir/fuzz-artifacts/$fuzzer"
  mkdir -p "$corpus"
  rm -rf "$artifacts" && mkdir -p "$artifacts"
  if [[ -d ${corpora[$fuzzer]} ]]; then
    cp -R "${corpora[$fuzzer]}/." "$corpus/"
  else
    echo "run.sh: $fuzzer: no corpus at ${corpora[$fuzzer]}; starting from nothing"
  fi
  seeds=$(find "$corpus" -type f | wc -l)
  options=(-max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb="$rss_limit_mb"
           -artifact_prefix="$artifacts/" -print_final_stats=1)
  if [[ -f tests/fuzz/$fuzzer.dict ]]; then options+=(-dict="tests/fuzz/$fuzzer.dict"); fi

  echo "::: $fuzzer: ${seconds}s on $seeds seed inputs"
  # The whole log goes to a file; the console gets progress and the final statistics.
  set +e
  "$binary" "${options[@]}" "$corpus" 2>&1 | tee "$artifacts/log.txt" |
    grep --line-buffered -E 'seed corpus|INITED|pulse|DONE|^stat::|^Done '
  status=${PIPESTATUS[0]}
  set -e

  saved=$(find "$artifacts" -type f ! -name log.txt)
  if [[ $status -ne 0 || -n $saved ]]; then
    failed+=("$fuzzer")
    echo "::: $fuzzer FAILED (exit $status); the end of its log ($artifacts/log.txt):" >&2
    grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "$artifacts/log.txt" | tail -n 60 >&2
    if [[ -n $saved ]]; then
      while IFS= read -r input; do
        echo "    input: $input" >&2
        echo "    replay: $binary $input" >&2
      done <<<"$saved"
    else
      echo "    no input was saved; see the log" >&2
    fi
  else
    echo "::: $fuzzer ok: corpus grew from $seeds to $(find "$corpus" -type f | wc -l) inputs" \
         "(scratch copy, discarded)"
  fi
done

if [[ ${#failed[@]} -ne 0 ]]; then
  echo "run.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "run.sh: all fuzzers ok: ${fuzzers[*]}"
