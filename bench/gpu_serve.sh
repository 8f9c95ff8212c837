#!/usr/bin/env bash
# The serving benchmark on one GPU host that has no internet, no redis-server and none of the
# mesh's own Python packages (the device machines: Python 3.12, torch 2.11+cu130, transformers).
#
#   bash bench/gpu_serve.sh                 # reduced sweep, < 10 minutes
#   bash bench/gpu_serve.sh --workloads random:1024:1024,random:8192:1024,random:128:2048,sharegpt \
#       --concurrency 1,4,16,64,256 --max-num-seqs 256 --deadline-s 0        # the full sweep (hours)
#
# Needs .device/redis and .device/serve-wheels from bench/fetch_device_deps.sh (run that on a
# machine with package registries) carried along. Steps: install the wheels into /tmp/rose-site,
# unpack redis-server into /tmp/rose-redis (never onto /), write a random gpt-oss-20b checkpoint
# (real shapes, MXFP4 experts; values drawn and quantized on the GPU) with ROSE_BENCH_LAYERS of
# its 24 layers (default: all), then run bench.serve on cuda with the cuda backend, or the
# torch backend if the cuda one does not start. Extra arguments go to bench.serve and override
# the reduced defaults. Results: $OUT (or bench/out/gpu-serve)/serve.json, serve.png.
# The full sweep in parts, one device call each (commit each part's serve.json there for the next):
#   ROSE_BENCH_RESUME=bench/results/full-sweep bash bench/gpu_serve.sh --workloads ... (the full sweep's arguments)
# A CPU smoke test of the same steps (the carried redis-server included):
#   ROSE_BENCH_DEVICE=cpu ROSE_BENCH_PRESET=tiny ROSE_BENCH_CARRIED_REDIS=1 bash bench/gpu_serve.sh \
#       --workloads random:32:8 --concurrency 1,2 --num-prompts 2
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
LAYERS=${ROSE_BENCH_LAYERS:-}  # empty: all of the preset's layers
PRESET=${ROSE_BENCH_PRESET:-20b}
DEVICE=${ROSE_BENCH_DEVICE:-cuda}
DTYPE=$([ "$DEVICE" = cpu ] && echo float32 || echo bfloat16)
RESULTS=${OUT:-$REPO/bench/out/gpu-serve}
CKPT=${ROSE_BENCH_CHECKPOINT:-/tmp/rose-gpt-oss-${PRESET}${LAYERS:+-${LAYERS}l}}
SITE=/tmp/rose-site
REDIS=/tmp/rose-redis
start=$(date +%s)
stamp() { echo "[gpu_serve +$(( $(date +%s) - start ))s] $*"; }

# 1. Python packages the image lacks: the carried wheels, when an import fails
imports() { "$PY" -c "import zmq, redis, openai_harmony, fastapi, uvicorn, pydantic, quicktok, opentelemetry.sdk, msgpack, httpx, transformers, matplotlib" 2>/dev/null; }
if ! imports; then
  ls .device/serve-wheels/*.whl >/dev/null 2>&1 || { echo "Python packages are missing and .device/serve-wheels was not carried: run bench/fetch_device_deps.sh where registries answer"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .device/serve-wheels/*.whl
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  imports || { "$PY" -c "import zmq, redis, openai_harmony, fastapi, uvicorn, pydantic, quicktok, opentelemetry.sdk, msgpack, httpx, transformers, matplotlib"; exit 1; }
  stamp "installed $(ls .device/serve-wheels/*.whl | wc -l) carried wheels into $SITE"
fi

# The cuda backend's packages (nvidia-cutlass-dsl, flashinfer, tvm-ffi) are too big to carry with
# the above in one call: a call just before this one on the same warm machine can stage them with
# `eval "$(bash .device/stage.sh)"` into ~/rose-site, which is then used here.
if [ -d "$HOME/rose-site" ]; then
  export PYTHONPATH=$HOME/rose-site:$HOME/rose-site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
  export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
  stamp "using the packages staged in $HOME/rose-site: $(ls -a "$HOME/rose-site" | grep '^\.staged-' | tr '\n' ' ')"
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# triton-kernels (bench/fetch_device_deps.sh): the decode graphs' expert GEMMs past 128 rows use it when it imports
[ -d .device/triton-kernels ] && export PYTHONPATH=$PWD/.device/triton-kernels:$PYTHONPATH

# 2. redis-server (the launcher starts a private one from PATH)
if ! command -v redis-server >/dev/null || [ -n "${ROSE_BENCH_CARRIED_REDIS:-}" ]; then
  ls .device/redis/*.deb >/dev/null 2>&1 || { echo "no redis-server and no .device/redis: run bench/fetch_device_deps.sh and carry .device/redis"; exit 1; }
  mkdir -p "$REDIS/bin"
  for deb in .device/redis/*.deb; do
    if command -v dpkg-deb >/dev/null; then dpkg-deb -x "$deb" "$REDIS"
    else (tmp=$(mktemp -d) && cd "$tmp" && ar x "$REPO/$deb" && tar -xf data.tar.* -C "$REDIS" && rm -rf "$tmp"); fi
  done
  libs=$REDIS/usr/lib/x86_64-linux-gnu:$REDIS/lib/x86_64-linux-gnu
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' "$libs" "$REDIS/usr/bin/redis-server" > "$REDIS/bin/redis-server"
  chmod +x "$REDIS/bin/redis-server"
  export PATH=$REDIS/bin:$PATH
  redis-server --version || { echo "the carried redis-server does not run here:"; LD_LIBRARY_PATH=$libs ldd "$REDIS/usr/bin/redis-server" | grep "not found"; exit 1; }
  stamp "redis-server unpacked into $REDIS"
fi

# 3. the checkpoint: real gpt-oss-20b shapes, random weights
if [ "$PRESET" = 20b ] && [ -n "$LAYERS" ] && [ "$LAYERS" != 24 ]; then
  stamp "NOTE: the checkpoint keeps $LAYERS of gpt-oss-20b's 24 layers (ROSE_BENCH_LAYERS); the roofline uses the same $LAYERS"
fi
"$PY" -m services.cli make-checkpoint --preset "$PRESET" ${LAYERS:+--layers "$LAYERS"} --out "$CKPT" --generate-on "$DEVICE"
stamp "checkpoint ready at $CKPT ($(du -sh "$CKPT" | cut -f1))"

# 4. the sweep: the cuda backend if it starts, else torch on cuda
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mkdir -p "$RESULTS"
# No run starts after ROSE_BENCH_BUDGET_S seconds from this script's start (default 450), so one
# device command of 600 s holds it all; the report is rewritten after each run.
left=$(( ${ROSE_BENCH_BUDGET_S:-450} - ($(date +%s) - start) ))
# one workload: with all 24 layers, mesh + engine + transformers took 6.6 of a call's 10 minutes; the
# mesh's second pass (mesh#2, with its ratio to the first) shows the run-to-run spread in the same call
# ROSE_BENCH_RESUME=DIR: a long sweep in parts (bench/serve_resume.py): DIR's serve.json, from the part
# before, seeds $RESULTS and only its missing runs run
RESUME=()
if [ -n "${ROSE_BENCH_RESUME:-}" ]; then
  RESUME=(--resume)
  if [ -f "$ROSE_BENCH_RESUME/serve.json" ]; then
    mkdir -p "$RESULTS" && cp "$ROSE_BENCH_RESUME/serve.json" "$RESULTS/serve.json"
    stamp "resuming from $ROSE_BENCH_RESUME/serve.json"
  else
    stamp "no $ROSE_BENCH_RESUME/serve.json yet: the first part"
  fi
fi
REDUCED=(--workloads random:1024:128 --concurrency 1,8,64 --references engine,hf --mesh-repeats 2
         --goodput ttft:1000 tpot:100 --deadline-s "$(( left > 30 ? left : 30 ))")
for backend in ${ROSE_BENCH_BACKENDS:-$([ "$DEVICE" = cpu ] && echo torch || echo cuda torch)}; do
  stamp "bench.serve with --backend $backend"
  set +e
  "$PY" -m bench.serve "${REDUCED[@]}" --model "$CKPT" --home /tmp/rose-home --device "$DEVICE" --dtype "$DTYPE" \
    --backend "$backend" --max-model-len 16384 --out "$RESULTS" ${RESUME[@]+"${RESUME[@]}"} "$@"
  code=$?
  set -e
  [ $code -ne 3 ] && break  # 3: the mesh did not start with this backend
  stamp "the mesh did not start with --backend $backend"
done
stamp "done (exit $code); results in $RESULTS"
exit $code
