#!/usr/bin/env bash
# Build llama.cpp as an OPTIONAL reference oracle (never used by graftlm at runtime, never by CI).
#
# One compile gives both:
#   * command-line tools llama-quantize and llama-bench   -> $PREFIX/bin
#   * the shared libraries (libllama, libggml*)           -> $PREFIX/lib
#   * the Python bindings llama-cpp-python, installed WITHOUT compiling its own copy of llama.cpp
#     (CMAKE_ARGS=-DLLAMA_BUILD=OFF), with the libraries above copied into its llama_cpp/lib
#     (so `import llama_cpp` works as usual; LLAMA_CPP_LIB_PATH=$PREFIX/lib also works).
# The llama.cpp tree compiled is the one vendored in the llama-cpp-python sdist, so the ctypes
# bindings and the library come from the same llama.cpp commit.
#
# Flags: GCC 12 with -march=native enables ggml's AMX path, which crashes on the Intel CPUs with
# AMX seen here (see /work/shared/FACTS.md), so there native detection is off and the AVX-512
# extensions are named. Any other CPU (AVX2-only AMD EPYC, say) builds with -march=native: naming
# AVX-512 there would make binaries that die with an illegal instruction.
#
# Idempotent: re-running skips the download/extract, reuses the ninja build directory (only
# rebuilds what changed) and re-installs.  Run it under `nice -n 19` on a shared machine.
# Usage: tools/build_llamacpp.sh            (env: PREFIX, LLAMA_CPP_PYTHON_VERSION, JOBS)
set -euo pipefail

PREFIX="${PREFIX:-/opt/llamacpp}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
if grep -qw amx_tile /proc/cpuinfo; then
    GGML_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
                -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON)
else
    GGML_FLAGS=(-DGGML_NATIVE=ON)
fi

SRC_ROOT="$PREFIX/src"
SDIST="$SRC_ROOT/llama_cpp_python-$VERSION.tar.gz"
SRC="$SRC_ROOT/llama_cpp_python-$VERSION"
TREE="$SRC/vendor/llama.cpp"
BUILD="$PREFIX/build"
mkdir -p "$SRC_ROOT" "$PREFIX/bin" "$PREFIX/lib"

t0=$(date +%s)
# 1. Source: the llama-cpp-python sdist from PyPI (it vendors llama.cpp, with git metadata for build info).
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -d "$SRC_ROOT"
fi
if [ ! -d "$TREE" ]; then
    tar -xzf "$SDIST" -C "$SRC_ROOT"
fi

# 2. Configure the vendored tree standalone: shared libs + tools, no server/tests/examples/HTTPS.
#    RPATH $ORIGIN:$ORIGIN/../lib so binaries run from both build/bin and $PREFIX/bin.
if [ ! -f "$BUILD/build.ninja" ]; then
    cmake -S "$TREE" -B "$BUILD" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON \
        "${GGML_FLAGS[@]}" \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
        -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
        '-DCMAKE_INSTALL_RPATH=$ORIGIN:$ORIGIN/../lib'
fi

# 3. Build only what is needed (library + the two tools; their deps come along).
nice -n 19 cmake --build "$BUILD" -j "$JOBS" --target llama llama-quantize llama-bench
t1=$(date +%s)

# 4. Install tools and libraries under $PREFIX.
cp -f "$BUILD/bin/llama-quantize" "$BUILD/bin/llama-bench" "$PREFIX/bin/"
for f in "$BUILD"/bin/lib*.so*; do cp -Pf "$f" "$PREFIX/lib/"; done

# 5. Python bindings: pure-Python install (no second compile), then drop the libraries in.
if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" 2>/dev/null; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        "$PYTHON" -m pip install --no-deps --no-cache-dir "$SDIST"
    "$PYTHON" -m pip install "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"
fi
PKG_DIR=$("$PYTHON" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llama_cpp').origin))")
mkdir -p "$PKG_DIR/lib"
for f in "$PREFIX"/lib/lib*.so*; do cp -Pf "$f" "$PKG_DIR/lib/"; done
t2=$(date +%s)

# 6. Smoke test and report.
"$PREFIX/bin/llama-bench" --help >/dev/null
"$PYTHON" - <<'EOF'
import llama_cpp
print("llama-cpp-python", llama_cpp.__version__, "from", llama_cpp.__file__)
print("system info:", llama_cpp.llama_print_system_info().decode())
EOF
echo "llama.cpp source : $TREE ($(git -C "$TREE" rev-parse --short HEAD 2>/dev/null || echo unknown))"
echo "build directory  : $BUILD"
echo "tools            : $PREFIX/bin/llama-quantize $PREFIX/bin/llama-bench"
echo "shared libraries : $PREFIX/lib (also copied into $PKG_DIR/lib)"
echo "python bindings  : $PKG_DIR"
echo "flags            : ${GGML_FLAGS[*]}"
echo "seconds          : compile $((t1 - t0)), install $((t2 - t1))"
