#!/usr/bin/env bash
# Compiles every csrc/kernels/*.cuh with nvcc for sm_80 and sm_90; no GPU and no torch needed.
#
# Each header gets a generated translation unit that includes it and, through the header's own
# KDENGINE_INSTANTIATE_<NAME>(T) macro, explicitly instantiates every launcher for float, double,
# __half and __nv_bfloat16, so all kernels of all variants are compiled. The macro lives next to
# the launchers; this script fails if a launcher (a top-level `cudaError_t f(` or
# `int64_t f_workspace_size(`) is missing from it. Warnings are errors, and the defines torch's
# CUDAExtension passes (no implicit half / bfloat16 conversions) are set.
#
# Environment: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), JOBS (parallel
# compilations, default: number of CPUs), KDENGINE_REQUIRE_NVCC (1: a missing nvcc fails, as in
# CI; otherwise the check is skipped with a message, so `make test` runs the suite on machines
# without the CUDA toolkit).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${NVCC:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC=nvcc
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
  elif [[ "${KDENGINE_REQUIRE_NVCC:-0}" == 1 ]]; then
    echo "check_cuda_kernels: nvcc not found and KDENGINE_REQUIRE_NVCC=1 (install the CUDA toolkit or set NVCC=...)" >&2
    exit 1
  else
    echo "check_cuda_kernels: skipped: nvcc not found (install the CUDA toolkit or set NVCC=...;" \
         "KDENGINE_REQUIRE_NVCC=1 makes this an error)"
    exit 0
  fi
fi
JOBS=${JOBS:-$(nproc)}

TYPES=(float double __half __nv_bfloat16)
FLAGS=(
  -std=c++17 -O3
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Werror all-warnings
  -Xcompiler -Wall,-Wextra,-Werror
)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

shopt -s nullglob
headers=(csrc/kernels/*.cuh)
if (( ${#headers[@]} == 0 )); then
  echo "check_cuda_kernels: no csrc/kernels/*.cuh found" >&2
  exit 1
fi

echo "check_cuda_kernels: $("$NVCC" --version | tail -n 1)"
echo "check_cuda_kernels: sm_80 + sm_90, types: ${TYPES[*]}"

# Writes the translation unit of one header to $tmp/<name>.cu; fails on a launcher missing from
# the instantiation macro or a header with launchers but no macro.
generate() {
  local header=$1 name macro body launchers missing=()
  name=$(basename "$header" .cuh)
  macro=$(grep -oE '^#define KDENGINE_INSTANTIATE_[A-Z0-9_]+\(' "$header" | sed -E 's/^#define //; s/\($//' || true)
  launchers=$(grep -oE '^(cudaError_t [A-Za-z0-9_]+|int64_t [A-Za-z0-9_]+_workspace_size)\(' "$header" \
              | sed -E 's/^[A-Za-z0-9_]+ //; s/\($//' || true)
  if [[ -n "$launchers" && -z "$macro" ]]; then
    echo "check_cuda_kernels: $header declares launchers but no KDENGINE_INSTANTIATE_* macro" >&2
    return 1
  fi
  if [[ $(grep -c . <<<"$macro") -gt 1 ]]; then
    echo "check_cuda_kernels: $header defines more than one KDENGINE_INSTANTIATE_* macro" >&2
    return 1
  fi
  if [[ -n "$macro" ]]; then
    # The macro's body: its #define line and every continuation line after it.
    body=$(awk -v m="#define $macro(" 'index($0, m) == 1 { on = 1 } on { print; if ($0 !~ /\\$/) exit }' "$header")
    for f in $launchers; do
      grep -qE "[^A-Za-z0-9_]$f<" <<<"$body" || missing+=("$f")
    done
    if (( ${#missing[@]} )); then
      echo "check_cuda_kernels: $macro in $header does not instantiate: ${missing[*]}" >&2
      return 1
    fi
  fi
  {
    echo "#include \"$PWD/$header\""
    if [[ -n "$macro" ]]; then
      for type in "${TYPES[@]}"; do echo "$macro($type)"; done
    fi
  } >"$tmp/$name.cu"
  if [[ -n "$macro" ]]; then
    echo "  $header: $macro -> $(tr '\n' ' ' <<<"$launchers")"
  else
    echo "  $header: no launchers (compiled standalone)"
  fi
}

for header in "${headers[@]}"; do
  generate "$header"
done

# Compiles one translation unit (run by xargs, JOBS at a time); prints the result.
compile() {
  local unit=$1 name start flags
  read -ra flags <<<"$NVCC_FLAGS"
  name=$(basename "$unit" .cu)
  start=$SECONDS
  if "$NVCC" "${flags[@]}" -c "$unit" -o "${unit%.cu}.o" >"${unit%.cu}.log" 2>&1; then
    echo "  ok    $name.cuh ($((SECONDS - start)) s)"
  else
    echo "  FAIL  $name.cuh" >&2
    sed 's/^/        /' "${unit%.cu}.log" >&2
    return 1
  fi
}
export -f compile
export NVCC NVCC_FLAGS="${FLAGS[*]}"

if ! printf '%s\n' "$tmp"/*.cu | xargs -P "$JOBS" -I{} bash -c 'compile "$1"' _ {}; then
  echo "check_cuda_kernels: FAILED" >&2
  exit 1
fi
echo "check_cuda_kernels: all ${#headers[@]} headers compile"
