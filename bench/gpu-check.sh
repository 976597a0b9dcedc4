#!/usr/bin/env bash
# GPU check for a session that gets a lent GPU machine (H100/H200; no package registry there).
# From the repository root, through the device tool:
#     bash bench/gpu-check.sh [pytest args for bench/, e.g. -k "gpu or resnet110"]
#     GPU_CHECK_MODE=quick bash bench/gpu-check.sh     # build, the new kernels' tests, their timing (~4 min)
#     GPU_CHECK_MODE=measure bash bench/gpu-check.sh   # build, then only issue 6's figures (~5 min)
# (GPU_CHECK_QUICK=1 is GPU_CHECK_MODE=quick.) A lent machine has about 15 minutes a session,
# start-up included, and the whole run (full mode) takes about 15: a session runs quick, then
# measure, as two calls; full mode is for a machine of one's own.
# (.gpu/run.sh is the same script, git-ignored.) It builds the package with the CUDA
# kernels (no build isolation, no deps), checks what was built, runs the CUDA tests and the
# benchmarks, and leaves logs and the benchmark JSON under $OUT (./gpu-out when unset).
#
# The installed package is what runs: pytest starts with `python3 -P` (no cwd on sys.path),
# so the source tree's drt_fast, which has no compiled modules there (they are git-ignored
# and do not travel), does not shadow it. If `pip install` fails (a missing build
# requirement: setuptools, pybind11, cmake, ninja), the kernels are built in place instead
# and the source tree runs.
set -u -o pipefail
out="${OUT:-gpu-out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 CMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}" DRT_FAST_CUDA=1
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
python3 -c "import os; print('cpus', os.cpu_count())" | tee -a "$out/gpu.txt"

py=(python3 -P)
if python3 -m pip install -q --no-build-isolation --no-deps . > "$out/build.log" 2>&1; then
    echo "build: pip install --no-build-isolation . (CMAKE_CUDA_ARCHITECTURES=$CMAKE_CUDA_ARCHITECTURES)" | tee -a "$out/gpu.txt"
else
    tail -20 "$out/build.log"
    echo "pip install failed; building in place (python3 setup.py build_ext --inplace)" | tee -a "$out/gpu.txt"
    python3 setup.py build_ext --inplace >> "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
    py=(python3)
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
tail -3 "$out/build.log"
"${py[@]}" -c "import drt_fast, drt_fast.ops as o; print('drt_fast from', drt_fast.__file__); print('cuda kernels:', drt_fast.cuda_available())" 2>&1 | tee -a "$out/gpu.txt"

mode="${GPU_CHECK_MODE:-full}"
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && mode=quick
kernel_case="bench/test_certify.py::test_certify_gpu[cifar_resnet110-bf16-kernel]"
if [ "$mode" = measure ]; then
    # Issue 6's open figures, most wanted first, each in its own process under a timeout:
    # <= 1 s per CIFAR image with the ResNet kernel (and cuDNN's bf16 figure beside it), then
    # the CUDA noise and vote kernels against their targets, then the noise + vote share, then
    # the DRT / Gaussian training-step ratio.
    timeout 150 "${py[@]}" -m pytest -q -s "$kernel_case" -p no:cacheprovider --benchmark-json "$out/bench-kernel.json" 2>&1 \
        | tee "$out/bench-kernel.log" | grep -E "^\[(ratio|abs|fuse|target)\]|passed|skipped|failed|error|Warning" | tail -20
    timeout 120 "${py[@]}" -m pytest -q -s "bench/test_certify.py::test_certify_gpu[cifar_resnet110-bf16]" -p no:cacheprovider \
        --benchmark-json "$out/bench-cudnn.json" 2>&1 | tee "$out/bench-cudnn.log" | grep -E "^\[(ratio|abs|fuse|target)\]|passed|skipped|failed|error" | tail -20
    timeout 150 "${py[@]}" -m pytest -q -s bench/test_kernels.py -k cuda -p no:cacheprovider --benchmark-json "$out/bench-kernels.json" 2>&1 \
        | tee "$out/bench-kernels.log" | grep -E "^\[(ratio|bandwidth|target)\]|passed|skipped|failed|error" | tail -40
    timeout 90 "${py[@]}" -m pytest -q -s bench/test_certify.py -k "share and bf16" -p no:cacheprovider 2>&1 \
        | tee "$out/bench-share.log" | grep -E "^\[(share|target)\]|passed|skipped|failed|error" | tail -10
    # the DRT / Gaussian step ratio, owed again since the bench fits its members to the batch
    timeout 120 "${py[@]}" -m pytest -q -s bench/test_train.py -k cuda -p no:cacheprovider --benchmark-json "$out/bench-train.json" 2>&1 \
        | tee "$out/bench-train.log" | grep -E "^\[(ratio|target)\]|passed|skipped|failed|error" | tail -10
    # last (a 600 s call may end before it): sequential certification against fixed n, 3x
    # ResNet-110 bf16
    timeout 150 "${py[@]}" -m pytest -q -s bench/test_sequential.py -k gpu -p no:cacheprovider \
        --benchmark-json "$out/bench-sequential.json" 2>&1 | tee "$out/bench-sequential.log" \
        | grep -E "^\[(ratio|target)\]|passed|skipped|failed|error" | tail -10
    exit 0
fi

# First the kernels that have not run on a GPU before, each test file in its own process (a
# faulting kernel poisons the CUDA context for the rest of a process), and the whole-network
# ResNet kernel's member forwards against cuDNN's fused members.
# (timeouts: a kernel that deadlocks must not eat the session's device time; quick mode's
# add up to under 10 minutes, one device call)
timeout 120 "${py[@]}" -m pytest -q tests/test_cifar_resnet_kernel.py -p no:cacheprovider 2>&1 | tee "$out/tests-cifar-resnet-kernel.log" | tail -5
if [ "${PIPESTATUS[0]}" != 0 ]; then  # where the GPU parts from the host program, phase by phase
    timeout 90 "${py[@]}" bench/cifar_resnet_debug.py --depth 8 2>&1 | tee "$out/cifar-resnet-debug.log" | tail -40
fi
# the ops (noise, vote for any class count, canonical NaNs), their first-use self-check, the
# engine's CUDA graphs and rewrites: none of the code of 2026-11-26 and later has run on a GPU
timeout 150 "${py[@]}" -m pytest -q tests/test_ops.py tests/test_cuda_kernels_on_host.py tests/test_ops_extension.py \
    tests/test_graphs.py tests/test_engine_runner.py tests/test_smoothing.py -k "cuda" -p no:cacheprovider 2>&1 \
    | tee "$out/tests-ops.log" | tail -5
timeout 150 "${py[@]}" bench/gpu_levers.py --batches 2000,4000 --only "cudnn-fused|kernel" --json "$out/levers-kernel.json" 2>&1 \
    | tee "$out/levers-kernel.log" | grep -E "ms/1000|error|Error" | tail -10
[ "$mode" = quick ] && exit 0

"${py[@]}" -m pytest -q tests -k "cuda or gpu" --ignore tests/test_cifar_resnet_kernel.py -p no:cacheprovider 2>&1 \
    | tee "$out/tests.log" | tail -15
# -s: the per-case [ratio] / [abs] / [share] / [bandwidth] / [target] lines go to bench.log as well.
"${py[@]}" -m pytest -q -s bench/ -p no:cacheprovider --deselect "$kernel_case" --benchmark-json "$out/bench.json" "$@" 2>&1 \
    | tee "$out/bench.log" | grep -E "^\[(ratio|abs|fuse|share|bandwidth|target)\]|passed|failed|error" | tail -100
"${py[@]}" -m pytest -q -s "$kernel_case" -p no:cacheprovider --benchmark-json "$out/bench-kernel.json" 2>&1 \
    | tee "$out/bench-kernel.log" | grep -E "^\[(ratio|abs|fuse|target)\]|passed|failed|error|Warning" | tail -20
