#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp compiled from source) into ./.venv with the flags that run
# deepseek2 GGUFs on this project's CPUs. Why these flags: bench/llama_build.md.
#
#   bench/build_llama_cpp.sh            # about 4 minutes on 2 cores (measured: 239 s for 0.3.36)
#   VERSION=0.3.36 bench/build_llama_cpp.sh
#   ISA=avx2 TARGET=.llama-avx2 bench/build_llama_cpp.sh   # an AVX2-only build beside the native one
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VERSION=${VERSION:-0.3.36}

# Native detection would turn on AMX, and llama.cpp then aborts on deepseek2 models at context
# creation (GGML_ASSERT(*cur_backend_id != -1)). Name the instruction set explicitly and keep AMX off;
# the Q4_0 / Q8_0 repacked CPU kernels (REPACK) stay on. ISA=auto takes AVX-512 where the CPU has
# avx512f/bw/vl/vnni/bf16, else AVX2 (avx2, fma, f16c); ISA=avx2 builds the AVX2 kernels on any CPU
# (the baseline for this project's forced AVX2 path). TARGET=DIR installs into DIR (pip --target)
# instead of the venv, so an AVX2 build can sit beside the native one (PYTHONPATH=DIR picks it).
ISA=${ISA:-auto}
if [ "$ISA" = auto ]; then
  ISA=avx512
  flags=" $(grep -m1 '^flags' /proc/cpuinfo || true) "
  for f in avx512f avx512bw avx512vl avx512_vnni avx512_bf16; do
    case "$flags" in *" $f "*) ;; *) ISA=avx2;; esac
  done
fi
COMMON="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
case "$ISA" in
  avx512) export CMAKE_ARGS="$COMMON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON";;
  avx2)   export CMAKE_ARGS="$COMMON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF";;
  *) echo "ISA=$ISA: use auto, avx512 or avx2" >&2; exit 2;;
esac
echo "building llama.cpp for $ISA"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

start=$(date +%s)
TARGET_ARGS=()
[ -n "${TARGET:-}" ] && TARGET_ARGS=(--target "$TARGET" --no-deps)
"$PY" -m pip install --no-binary llama-cpp-python --no-cache-dir "${TARGET_ARGS[@]}" "llama-cpp-python==${VERSION}"
echo "built in $(( $(date +%s) - start )) s"
[ -n "${TARGET:-}" ] && export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import llama_cpp; print(llama_cpp.__version__); print(llama_cpp.llama_print_system_info().decode())"
