#!/usr/bin/env bash
# The CUDA checks, for a machine with an NVIDIA GPU whose python3 already has a CUDA build of torch
# (and transformers, tokenizers, safetensors, jinja2, pytest): no .venv is made, the project runs
# from this checkout through PYTHONPATH. Wheels of what that python lacks (pygls, lsprotocol,
# cattrs, pytest-asyncio, pytest-lsp) may lie in .whl/ and are installed beside it.
#
#   bash scripts/cuda_checks.sh [OUT_DIR]
#
# 1. every test marked `cuda`; 2. the suites that load models, with the GPU as the default
# device (they must pass there too); 3. bench/engine_bench.py on the GPU in bfloat16, the decode
# step run plainly and captured in a CUDA graph (CUDA_CHECKS_DECODE_STEPS="off cuda-graph"). Logs
# go to OUT_DIR (default: bench/out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/out}
mkdir -p "$out"
py=${PYTHON:-python3}
site=$(mktemp -d)
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
fi
mkdir -p "$site/stablelm_lsp"
for pkg in lsp inference models; do ln -s "$PWD/$pkg" "$site/stablelm_lsp/$pkg"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export STABLELM_LSP_CACHE=${STABLELM_LSP_CACHE:-$(mktemp -d)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', torch.cuda.device_count(), 'transformers', transformers.__version__)"
"$py" -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed"

rc=0
xdist=(); "$py" -c "import xdist" 2>/dev/null && xdist=(-n "$(( $(nproc) < 16 ? $(nproc) : 16 ))")
timeout=(); "$py" -c "import pytest_timeout" 2>/dev/null && timeout=(--timeout 300)
echo "== tests marked cuda"
"$py" -m pytest -q -p no:cacheprovider -m cuda -rs "${timeout[@]}" tests 2>&1 | tee "$out/cuda_tests.log" || rc=1
echo "== model, engine and CLI suites with the GPU present"
"$py" -m pytest -q -p no:cacheprovider -m "not cuda" -rs "${xdist[@]}" "${timeout[@]}" \
    tests/test_models.py tests/test_model_errors.py tests/test_engine.py tests/test_engine_backend.py \
    tests/test_engine_attention.py tests/test_engine_linear.py tests/test_engine_captured.py \
    tests/test_engine_speculation.py tests/test_engine_faults.py tests/test_cli_generate.py \
    tests/test_sampling.py \
    2>&1 | tee "$out/gpu_present_tests.log" || rc=1
for step in ${CUDA_CHECKS_DECODE_STEPS:-off cuda-graph}; do
    echo "== bench/engine_bench.py --device cuda --dtype bfloat16 --decode-step $step"
    "$py" bench/engine_bench.py --device cuda --dtype bfloat16 --decode-step "$step" --keystrokes 10 \
        --compare-keystrokes 5 --scratch-keystrokes 3 --no-llama 2>&1 \
        | tee "$out/engine_bench_cuda_$step.log" || rc=1
done
exit $rc
