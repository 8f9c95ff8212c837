#!/usr/bin/env bash
# The GPU checks of a change to the worker's GPU path, in one command on a GPU host (< 10 minutes):
#
#   bash bench/gpu_checks.sh              # GPU tests, then decode step and engine loop at batch 1, 8, 64
#   ROSE_CHECKS=bench bash bench/gpu_checks.sh   # the benches only; ROSE_CHECKS=tests: the tests only
#   ROSE_CHECKS=bench,ab bash bench/gpu_checks.sh  # and the decode step again without PDL and without XQA
#   ROSE_CHECKS=gemv bash bench/gpu_checks.sh      # the MXFP4 decode GEMV sweep (CuTeDSL only: no FlashInfer)
#   ROSE_CHECKS=split bash bench/gpu_checks.sh     # the split decode attention: its model-level tests, then the
#                                                  # decode step with it (ROSE_DECODE_ATTENTION=split)
#   ROSE_CHECKS=route bash bench/gpu_checks.sh     # the fused norm + router + routing: its tests, then the decode
#                                                  # step without it (ROSE_FUSED_ROUTE=0)
#   ROSE_CHECKS=qkvrope bash bench/gpu_checks.sh   # the QKV GEMV with rotary + cache write: its tests, the graph
#                                                  # tests, then the decode step without it (ROSE_FUSED_QKV_ROPE=0)
#   ROSE_CHECKS=early bash bench/gpu_checks.sh     # the MXFP4 GEMV tests, then the decode step with down's weight
#                                                  # copies after gate_up ends (ROSE_EARLY_DOWN=0)
#
# On the device tool's machines, stage the cuda backend's packages first (a call before, on the
# same warm machine: `eval "$(bash .device/stage.sh)"` carrying .device/stage.sh .device/cutedsl
# .device/wheels) and carry .device/stage.sh .device/flashinfer .device/ficache here; this script
# picks up ~/rose-site and unpacks the FlashInfer JIT cache if it was carried (and returns a fresh
# one in $OUT/ficache when it was not and FlashInfer built modules). Logs go to $OUT (default
# bench/out/gpu-checks); the summary lines are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu-checks}
mkdir -p "$OUT"
if [ -d "$HOME/rose-site" ]; then
  export PYTHONPATH=$HOME/rose-site:$HOME/rose-site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
  export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# triton-kernels (bench/fetch_device_deps.sh): the decode graphs' expert GEMMs past 128 rows use it when it imports
[ -d .device/triton-kernels ] && export PYTHONPATH=$PWD/.device/triton-kernels:$PYTHONPATH
if [ ! -d ~/.cache/flashinfer ] && ls .device/ficache/ficache.tar.xz.* >/dev/null 2>&1; then
  mkdir -p ~/.cache && cat .device/ficache/ficache.tar.xz.* | xz -d | tar xf - -C ~/.cache
fi
CHECKS=${ROSE_CHECKS:-tests,bench}
if [[ $CHECKS == *tests* ]]; then
  timeout 420 python3 -m pytest -m gpu tests/kernels -q -o asyncio_mode=strict -p no:cacheprovider \
    -W ignore::DeprecationWarning > "$OUT/gpu-tests.log" 2>&1
  echo "pytest exit $?" >> "$OUT/gpu-tests.log"
fi
if [[ $CHECKS == *bench* ]]; then
  timeout 150 python3 -m bench.decode_step --batches 1,8,64 --iters 20 --json "$OUT/decode.json" > "$OUT/decode.log" 2>&1
  echo "exit $?" >> "$OUT/decode.log"
  timeout 200 python3 -m bench.engine_step --batches 1,8,64 --json "$OUT/engine.json" > "$OUT/engine.log" 2>&1
  echo "exit $?" >> "$OUT/engine.log"
fi
if [[ $CHECKS == *ab* ]]; then  # the same decode step without PDL, and with FlashInfer's sink wrapper for decode
  # attention instead of XQA (kernels/pdl.py, kernels/decode_attention.py): each against the default run above
  ROSE_PDL=0 timeout 150 python3 -m bench.decode_step --batches 1,8,64 --iters 20 --json "$OUT/decode-nopdl.json" \
    > "$OUT/decode-nopdl.log" 2>&1
  echo "exit $?" >> "$OUT/decode-nopdl.log"
  ROSE_DECODE_ATTENTION=flashinfer timeout 200 python3 -m bench.decode_step --batches 1,8,64 --iters 20 \
    --json "$OUT/decode-flashinfer.json" > "$OUT/decode-flashinfer.log" 2>&1
  echo "exit $?" >> "$OUT/decode-flashinfer.log"
fi
if [[ $CHECKS == *gemv* ]]; then  # the MXFP4 decode GEMVs at 1 and 4 tokens (kernels/mxfp4_mma.py, mxfp4_gemv.py)
  timeout 200 python3 -m bench.gemv --no-dense --tokens 1,4 --json "$OUT/gemv.json" > "$OUT/gemv.log" 2>&1
  echo "exit $?" >> "$OUT/gemv.log"
fi
if [[ $CHECKS == *split* ]]; then  # kernels/split_decode.py against the float32 torch model and graph vs eager
  timeout 300 python3 -m pytest -m gpu tests/kernels/test_kernels_cuda_backend_gpu.py \
    tests/kernels/test_kernels_cuda_graphs_gpu.py tests/kernels/test_kernels_attention_gpu.py -q -s \
    -o asyncio_mode=strict -p no:cacheprovider -W ignore::DeprecationWarning > "$OUT/split-tests.log" 2>&1
  echo "pytest exit $?" >> "$OUT/split-tests.log"
  ROSE_DECODE_ATTENTION=split timeout 150 python3 -m bench.decode_step --batches 1,8,64 --iters 20 \
    --json "$OUT/decode-split.json" > "$OUT/decode-split.log" 2>&1
  echo "exit $?" >> "$OUT/decode-split.log"
fi
if [[ $CHECKS == *route* ]]; then  # kernels/norm_route.py: its tests, then the decode step without it
  # (ROSE_FUSED_ROUTE=0)
  timeout 200 python3 -m pytest -m gpu tests/kernels/test_kernels_norm_route_gpu.py -q -o asyncio_mode=strict \
    -p no:cacheprovider -W ignore::DeprecationWarning > "$OUT/route-tests.log" 2>&1
  echo "pytest exit $?" >> "$OUT/route-tests.log"
  ROSE_FUSED_ROUTE=0 timeout 150 python3 -m bench.decode_step --batches 1,8,64 --iters 20 \
    --json "$OUT/decode-unfused-route.json" > "$OUT/decode-unfused-route.log" 2>&1
  echo "exit $?" >> "$OUT/decode-unfused-route.log"
fi
if [[ $CHECKS == *qkvrope* ]]; then  # kernels/qkv_rope.py: its tests and the graph tests, then the decode step
  timeout 300 python3 -m pytest -m gpu tests/kernels/test_kernels_qkv_rope_gpu.py tests/kernels/test_kernels_gemv_gpu.py \
    tests/kernels/test_kernels_cuda_graphs_gpu.py -q -s -o asyncio_mode=strict -p no:cacheprovider \
    -W ignore::DeprecationWarning > "$OUT/qkvrope-tests.log" 2>&1
  echo "pytest exit $?" >> "$OUT/qkvrope-tests.log"
  ROSE_FUSED_QKV_ROPE=0 timeout 150 python3 -m bench.decode_step --batches 1,8,64 --iters 20 \
    --json "$OUT/decode-qkv-apart.json" > "$OUT/decode-qkv-apart.log" 2>&1
  echo "exit $?" >> "$OUT/decode-qkv-apart.log"
fi
if [[ $CHECKS == *early* ]]; then  # down's weight copies before its PDL wait (kernels/mxfp4_mma.py): the GEMV tests,
  # then the decode step with the copies after the wait (ROSE_EARLY_DOWN=0)
  timeout 300 python3 -m pytest -m gpu tests/kernels/test_kernels_mxfp4_gemv_gpu.py -q -o asyncio_mode=strict \
    -p no:cacheprovider -W ignore::DeprecationWarning > "$OUT/early-tests.log" 2>&1
  echo "pytest exit $?" >> "$OUT/early-tests.log"
  ROSE_EARLY_DOWN=0 timeout 150 python3 -m bench.decode_step --batches 1,8,64 --iters 20 \
    --json "$OUT/decode-late-down.json" > "$OUT/decode-late-down.log" 2>&1
  echo "exit $?" >> "$OUT/decode-late-down.log"
fi
if ! ls .device/ficache/ficache.tar.xz.* >/dev/null 2>&1 && [ -d ~/.cache/flashinfer ]; then
  mkdir -p "$OUT/ficache" && tar cf - -C ~/.cache flashinfer | xz -1 -T8 | split -b 15M - "$OUT/ficache/ficache.tar.xz."
fi
for log in gpu-tests decode engine decode-nopdl decode-flashinfer gemv split-tests decode-split route-tests \
    decode-unfused-route qkvrope-tests decode-qkv-apart early-tests decode-late-down; do
  [ -f "$OUT/$log.log" ] || continue
  echo "== $log"
  grep -E "^FAILED|^ERROR|passed|failed|skipped|^\| |exit [0-9]|vs float32|worst graph" "$OUT/$log.log" | tail -20
done
