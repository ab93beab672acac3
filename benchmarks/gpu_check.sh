#!/usr/bin/env bash
# The `triton` lookup on one NVIDIA GPU, in one device call of at most 8 minutes:
#   1. installs the carried wheels (jax-triton, and flax / omegaconf where the image lacks them);
#   2. runs the GPU tests (tests/test_triton.py -m gpu: values and both gradients against xla,
#      determinism, vmap, empty bags);
#   3. runs benchmarks/gpu_check.py: correctness at several shapes up to the paper's, copy
#      bandwidth, forward/backward time and bandwidth of triton, xla and torch's F.embedding_bag,
#      block-size variants, and a train step of the 373m Memory+ shape with triton and xla.
#   The reference's own Triton kernel is timed beside them when its file is in .device/reference/
#   (fetched from facebookresearch/memory, CC-BY-NC, never committed; see gpu_check.py).
# Writes under $OUT: nvidia_smi.txt, triton_smoke.log, pytest_gpu.log, gpu_check.log,
# gpu_check.json.
#
# The device image has its own python3 (3.12) with jax 0.11 (CUDA 13), triton, torch and flax, and
# no network. Fetch the wheels beforehand, here, from the repository root (.device/ is ignored):
#   for w in jax-triton==0.3.1 jax-triton==0.4.1 flax==0.12.8 omegaconf==2.4.0; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .device/wheels "$w"; done
# jax-triton 0.4 needs triton >= 3.7 and 0.3.1 triton >= 3.6; the script picks the one that fits the
# image's triton (3.6.0 on 2026-11-17), and falls back to the other if a small launch fails.
# Then call the device tool's run with
#   command: GPU_CHECK_TIMEOUT=315 bash benchmarks/gpu_check.sh   carry: [".device"]   timeout_s: 395
# (218 s on an H200 on 2026-11-30; GPU_CHECK_TIMEOUT bounds gpu_check.py, 360 s by default).
#
# `bash benchmarks/gpu_check.sh --dry-run` does the same on this machine's CPU (PYTHON picks the
# interpreter): the install into a scratch folder, the GPU tests (they skip), and
# gpu_check.py --dry-run.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
WHEELS=.device/wheels
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TRITON_DEFAULT_FP_FUSION=1
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

# 1. Wheels: one jax-triton (by the image's triton), flax 0.12 and omegaconf where missing.
triton_version=$("$PYTHON" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo none)
jax_triton=0.3.1
if [[ "$triton_version" != none ]] && "$PYTHON" -c "import sys; v = tuple(map(int, '$triton_version'.split('.')[:2])); sys.exit(v < (3, 7))"; then
  jax_triton=0.4.1
fi
wheels=("$WHEELS"/jax_triton-"$jax_triton"-*.whl)
"$PYTHON" -c 'import flax, sys; sys.exit(not flax.__version__.startswith("0.12."))' 2>/dev/null \
  || wheels+=("$WHEELS"/flax-0.12.8-*.whl)
"$PYTHON" -c 'import omegaconf' 2>/dev/null || wheels+=("$WHEELS"/omegaconf-2.4.0-*.whl)
site=/tmp/site
[[ $DRY == 1 ]] && site="$OUT/site-dry-run"  # proves the install; never imported on the CPU
stamp "triton $triton_version: installing ${wheels[*]} into $site"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --only-binary=:all: --python-version 3.12 --target "$site" "${wheels[@]}" || exit 1
if [[ $DRY == 1 ]]; then
  export JAX_PLATFORMS=cpu PYTHONPATH="$PWD"
else
  export JAX_PLATFORMS=cuda PYTHONPATH="$site:$PWD"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
    > "$OUT/nvidia_smi.txt" 2>&1
  # One small triton lookup; if this jax-triton cannot launch on the image's jax, try the other.
  smoke='import jax.numpy as jnp; from memjax.ops import embedding_bag
print(embedding_bag(jnp.ones((64, 32)), jnp.zeros((4, 3), jnp.int32), jnp.ones((4, 3)),
                    impl="triton").sum())'
  if ! "$PYTHON" -c "$smoke" > "$OUT/triton_smoke.log" 2>&1; then
    other=$([[ $jax_triton == 0.3.1 ]] && echo 0.4.1 || echo 0.3.1)
    stamp "jax-triton $jax_triton failed a launch (triton_smoke.log); trying $other"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$WHEELS"/jax_triton-"$other"-*.whl || exit 1
    "$PYTHON" -c "$smoke" >> "$OUT/triton_smoke.log" 2>&1 || stamp "jax-triton $other failed too"
  fi
fi

# 2. GPU tests: the triton kernels' own, and the lookup contract for the triton impl.
stamp "GPU tests"
timeout 180 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_triton.py \
  tests/test_lookup_contract.py 2>&1 \
  | tee "$OUT/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}

# 3. Measurements (gpu_check.json grows phase by phase, so a cut-short run keeps its figures).
stamp "gpu_check.py"
args=(--out "$OUT")
[[ $DRY == 1 ]] && args+=(--dry-run --reps 3)
timeout "${GPU_CHECK_TIMEOUT:-360}" "$PYTHON" benchmarks/gpu_check.py "${args[@]}" 2>&1 | tee "$OUT/gpu_check.log"
check_rc=${PIPESTATUS[0]}
rm -rf "$OUT/site-dry-run"
stamp "done: tests exit $tests_rc, gpu_check exit $check_rc"
exit $(( tests_rc || check_rc ))
