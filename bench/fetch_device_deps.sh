#!/usr/bin/env bash
# Fetch, on a machine with package registries, what bench/gpu_serve.sh needs on a GPU host that
# has no internet, no redis-server and none of the mesh's own Python packages:
#   .device/redis/*.deb   Debian redis-server, redis-tools and the libraries they link that such
#                         an image may lack (unpacked there into /tmp, never onto /)
#   .device/serve-wheels/*.whl  cp312 manylinux wheels of the Python packages the GPU image lacks
#                         (its list: /work/.library/device/KINDS.md), no dependencies pulled in
#   .device/triton-kernels/triton_kernels  OpenAI's triton-kernels, bench/triton_kernels_moe.py's
#                         reference: PyPI's triton-kernels is a placeholder, so this takes the copy
#                         vLLM's wheel vendors (vllm/third_party/triton_kernels; put the folder on
#                         PYTHONPATH there)
# .device/ is git-ignored; name it in the device run's `carry` list (about 20 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/redis .device/serve-wheels
grep -qxF /.device/ .git/info/exclude 2>/dev/null || echo /.device/ >> .git/info/exclude  # never committed

(cd .device/redis && apt-get download redis-server redis-tools liblzf1 libjemalloc2 libatomic1 libssl3)

# Versions pinned to what this repo's tests run with; the GPU image already has numpy, anyio,
# h11, click, httpx, msgpack, prometheus-client, pyyaml, safetensors, transformers, matplotlib.
WHEELS=(
  pyzmq==27.3.0 redis==8.1.0 openai-harmony==0.0.8 quicktok-v1==0.4.0
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 annotated-doc==0.0.7
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
)
PY=${PYTHON:-python3}
PLATFORMS=()
for n in 2_28 2_27 2_17 2014 1; do
  case $n in 2014) PLATFORMS+=(--platform manylinux2014_x86_64) ;; 1) PLATFORMS+=(--platform manylinux1_x86_64) ;;
    *) PLATFORMS+=(--platform "manylinux_${n}_x86_64") ;; esac
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .device/serve-wheels "${WHEELS[@]}"
# The vLLM wheel is ~340 MB; only its vendored triton_kernels (~0.4 MB, MIT) is kept.
VLLM=vllm==0.33.0
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$VLLM"
rm -rf .device/triton-kernels
"$PY" - "$tmp"/vllm-*.whl .device/triton-kernels <<'EOF'
import os, sys, zipfile
prefix = "vllm/third_party/"
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in wheel.namelist():
        if name.startswith(prefix + "triton_kernels/") and not name.endswith("/"):
            target = os.path.join(sys.argv[2], name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(wheel.read(name))
EOF
rm -rf "$tmp"
du -sh .device/redis .device/serve-wheels .device/triton-kernels
