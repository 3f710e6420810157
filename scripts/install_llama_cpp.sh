#!/usr/bin/env bash
# The real engine for tests/test_remote_llamacpp.py (scripts/test.sh runs this when
# STABLELM_TEST_REMOTE=1): llama-cpp-python's OpenAI-compatible server, and the llama.cpp
# converter of the same release (convert_hf_to_gguf.py with its gguf-py) to turn a test
# checkpoint into a GGUF file.
#
# pip builds llama-cpp-python from source (about 7 minutes on 2 cores) and keeps the wheel in its
# cache: later runs install in seconds. STABLELM_WHEELS names a folder with a wheel built before.
# The build is portable (no -march=native: a cached wheel may land on another CPU) and leaves out
# the multimodal library the tests do not use. CMAKE_ARGS set by the caller win.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-${STABLELM_LSP_VENV:-.venv}}
version=0.3.36
cache=${XDG_CACHE_HOME:-$HOME/.cache}/stablelm-lsp
pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@"; }

if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$version')" 2>/dev/null \
        || ! "$venv/bin/python" -c "import uvicorn, fastapi, sse_starlette, starlette_context, pydantic_settings" 2>/dev/null; then
    flags="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
    case $(uname -m) in x86_64|amd64) flags="$flags -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" ;; esac
    export CMAKE_ARGS=${CMAKE_ARGS:-$flags}
    echo "install_llama_cpp: llama-cpp-python[server]==$version (a source build the first time: minutes)"
    start=$SECONDS
    pip install ${STABLELM_WHEELS:+--find-links "$STABLELM_WHEELS"} "llama-cpp-python[server]==$version" 2>&1 \
        | grep -v "^WARNING: Location" || true
    "$venv/bin/python" -c "import llama_cpp, llama_cpp.server" \
        || { echo "install_llama_cpp: llama-cpp-python did not install" >&2; exit 1; }
    echo "install_llama_cpp: installed in $((SECONDS - start)) s"
fi

source=$cache/llama_cpp_python-$version/vendor/llama.cpp
if [ ! -f "$source/convert_hf_to_gguf.py" ]; then
    mkdir -p "$cache"
    sdist=$(ls "${STABLELM_WHEELS:-/nonexistent}"/sdist/llama_cpp_python-$version.tar.gz 2>/dev/null || true)
    if [ -z "$sdist" ]; then
        pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache/sdist" 2>&1 \
            | grep -v "^WARNING: Location" || true
        sdist=$cache/sdist/llama_cpp_python-$version.tar.gz
    fi
    top=llama_cpp_python-$version/vendor/llama.cpp
    tar -xzf "$sdist" -C "$cache" --wildcards "$top/convert_hf_to_gguf.py" "$top/conversion/*" "$top/gguf-py/*"
    [ -f "$source/convert_hf_to_gguf.py" ] || { echo "install_llama_cpp: no converter in $sdist" >&2; exit 1; }
fi
