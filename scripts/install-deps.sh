#!/usr/bin/env bash
# Installs every Debian 12 package that building, testing, benchmarking and the demo need.
# Idempotent: packages already present are left alone. The README, .ci/run and
# deploy/Dockerfile all call this one script, so it is the single list of dependencies.
#
# Usage: scripts/install-deps.sh [--runtime]
#   --runtime   only the shared libraries montaged needs at run time (for the container image)
set -euo pipefail

BUILD_PACKAGES=(
  # toolchain
  build-essential cmake ninja-build ccache pkg-config git unzip ca-certificates
  # gRPC, protobuf, Abseil (with the static archives of gRPC's own dependencies: the montage
  # CLI links them statically)
  libgrpc++-dev libgrpc-dev libc-ares-dev libre2-dev protobuf-compiler-grpc libprotobuf-dev
  protobuf-compiler libabsl-dev
  # googleapis and gRPC protos, used in place (never copied into the repository)
  golang-github-gogo-googleapis-dev libgoogle-common-protos-java grpc-proto
  # libraries the services link
  libcurl4-openssl-dev libsqlite3-dev libyaml-cpp-dev nlohmann-json3-dev prometheus-cpp-dev
  libhiredis-dev libespeak-ng-dev espeak-ng-data libevent-dev zlib1g-dev libxml2-dev
  libavformat-dev libavcodec-dev libavfilter-dev libavutil-dev libswscale-dev libswresample-dev
  # header-only: JSON Schema validation, Mustache templates (generation's prompt catalogue)
  rapidjson-dev libkainjow-mustache-dev
  # HTTP/2 server side (the gateway's listener, the fake LLM provider's h2c listener); HTTP/1.1
  # request parsing (the gateway); TLS for the gateway's listener (libevent_openssl)
  libnghttp2-dev libhttp-parser-dev libssl-dev
  # montaged's allocator (TCMalloc, minimal build; see MONTAGE_ALLOCATOR in CMakeLists.txt)
  libgoogle-perftools-dev
  # fuzz targets (libFuzzer)
  clang-14 libclang-rt-14-dev
  # tests and benchmarks
  googletest libgtest-dev libgmock-dev libbenchmark-dev
  nghttp2-client nghttp2-server nginx-light redis-server redis-tools util-linux procps curl python3
  espeak-ng
  # deployment checks
  docker-compose
)

RUNTIME_PACKAGES=(
  ca-certificates curl libgrpc++1.51 libprotobuf32 libcurl4 libsqlite3-0 libyaml-cpp0.7
  libprometheus-cpp-core1.0 libhiredis0.14 libespeak-ng1 espeak-ng-data libxml2 libevent-2.1-7 libevent-pthreads-2.1-7 libevent-openssl-2.1-7 libhttp-parser2.9 libnghttp2-14 libtcmalloc-minimal4 zlib1g
  libavformat59 libavcodec59 libavfilter8 libavutil57 libswscale6 libswresample4
)

packages=("${BUILD_PACKAGES[@]}")
if [[ "${1:-}" == "--runtime" ]]; then
  packages=("${RUNTIME_PACKAGES[@]}")
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
echo "install-deps: installing ${#missing[@]} packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
