#!/usr/bin/env bash
# Build and test the TiDAR C++ runtime: bash cpp/build.sh [BUILD_DIR]  (default: cpp/build)
#
# What a user would do by hand, in order:
# 1. the toolchain: cmake, ninja, g++, nlohmann-json3-dev, libgtest-dev (apt-get install when missing);
# 2. ONNX Runtime's C/C++ API headers: $ORT_INCLUDE_DIR, else Debian 13 (trixie)'s libonnxruntime-dev,
#    downloaded once into BUILD_DIR with a private apt sources list and private state and cache
#    folders (the system's apt sources are not touched) and unpacked with dpkg-deb;
# 3. ONNX Runtime's library: $ORT_LIBRARY, else the onnxruntime pip wheel's libonnxruntime.so.1.*
#    of the `python` in PATH, linked through libonnxruntime.so / .so.1 symlinks in BUILD_DIR;
# 4. configure (CMake, Ninja), build, run the unit tests (ctest);
# 5. print the path of tidar-generate as the last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="$(mkdir -p "${1:-$here/build}" && cd "${1:-$here/build}" && pwd)"
say() { echo "build.sh: $*" >&2; }

# -- 1. toolchain -------------------------------------------------------------------------------
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja-build)
command -v g++ >/dev/null || need+=(g++)
[ -f /usr/include/nlohmann/json.hpp ] || need+=(nlohmann-json3-dev)
[ -f /usr/include/gtest/gtest.h ] || need+=(libgtest-dev)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} (apt-get)"
    sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get install -y -q "${need[@]}" >&2 || { $sudo_ apt-get update -q >&2 && $sudo_ apt-get install -y -q "${need[@]}" >&2; }
fi

# -- 2. ONNX Runtime headers ----------------------------------------------------------------------
ort_include="${ORT_INCLUDE_DIR:-$build/ort/usr/include/onnxruntime}"
if [ ! -f "$ort_include/onnxruntime_cxx_api.h" ]; then
    say "fetching ONNX Runtime's C/C++ headers (Debian trixie libonnxruntime-dev)"
    apt_dir="$build/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    # The Debian mirror the machine already uses (its first non-security URI), for the trixie suite.
    mirror="$(grep -hoE '(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -oE 'https?://[^[:space:]]+' | grep -v security | head -n 1 || true)"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror:-http://deb.debian.org/debian} trixie main" \
        > "$apt_dir/sources.list"
    apt_opts=(-q -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
    [ "$(id -u)" -ne 0 ] || apt_opts+=(-o APT::Sandbox::User=root)  # root: no _apt download user needed
    apt-get "${apt_opts[@]}" update >&2
    (cd "$apt_dir" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >&2)
    dpkg-deb -x "$apt_dir"/libonnxruntime-dev_*.deb "$build/ort"
fi

# -- 3. ONNX Runtime library ----------------------------------------------------------------------
ort_lib="${ORT_LIBRARY:-}"
if [ -z "$ort_lib" ]; then
    py="$(command -v python || command -v python3)"
    capi="$("$py" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))' \
        2>/dev/null)" || { echo "error: $py cannot import onnxruntime (pip install onnxruntime), or set ORT_LIBRARY" >&2; exit 1; }
    ort_lib="$(ls "$capi"/libonnxruntime.so.1.* 2>/dev/null | head -n 1 || true)"
    [ -n "$ort_lib" ] || { echo "error: no libonnxruntime.so.1.* in $capi (pip install onnxruntime)" >&2; exit 1; }
fi
mkdir -p "$build/ort-lib"
ln -sf "$ort_lib" "$build/ort-lib/libonnxruntime.so.1"
ln -sf libonnxruntime.so.1 "$build/ort-lib/libonnxruntime.so"

# -- 4. configure, build, test --------------------------------------------------------------------
cmake -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DORT_INCLUDE_DIR="$ort_include" -DORT_LIB_DIR="$build/ort-lib" >&2
cmake --build "$build" >&2
(cd "$build" && ctest --output-on-failure >&2)

# -- 5. the tool ----------------------------------------------------------------------------------
echo "$build/tidar-generate"
