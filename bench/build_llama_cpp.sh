#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp compiled from source) into ./.venv with the flags that run
# deepseek2 GGUFs on this project's CPUs. Why these flags: bench/llama_build.md.
#
#   bench/build_llama_cpp.sh            # about 4 minutes on 2 cores (measured: 239 s for 0.3.36)
#   VERSION=0.3.36 bench/build_llama_cpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VERSION=${VERSION:-0.3.36}

# Native detection would turn on AMX, and llama.cpp then aborts on deepseek2 models at context
# creation (GGML_ASSERT(*cur_backend_id != -1)). Name the AVX-512 family explicitly and keep AMX off;
# the Q4_0 / Q8_0 repacked CPU kernels (REPACK) stay on.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
-DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

start=$(date +%s)
"$PY" -m pip install --no-binary llama-cpp-python --no-cache-dir "llama-cpp-python==${VERSION}"
echo "built in $(( $(date +%s) - start )) s"
"$PY" -c "import llama_cpp; print(llama_cpp.__version__); print(llama_cpp.llama_print_system_info().decode())"
