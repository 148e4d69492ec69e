"""The few CUDA runtime calls the TensorRT backend needs: ctypes over libcudart, loaded lazily.

Why ctypes and not cuda-python: TensorRT's wheels already pull in libcudart
(`nvidia-cuda-runtime-cu12`), so this adds no dependency, and the C ABI of these calls has
been stable across CUDA 11, 12 and 13. Every call checks its status and raises `CudaError`
(a one-line TiDARError naming the call and CUDA's own error string).

Pointers are plain Python ints (device pointers, pinned host pointers, streams, graphs).
`pinned_array` gives a numpy view of page-locked host memory, the only kind of host memory
that asynchronous copies (and CUDA-graph memcpy nodes) accept without staging.

Nothing here is imported by `tidar_runtime` at import time; `load()` finds the library on
first use: $TIDAR_CUDART, then the usual sonames, then the `nvidia/cuda_runtime` wheel
directories on sys.path.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from dataclasses import dataclass

import numpy as np

from tidar_runtime.errors import TiDARError

# Enum values of the CUDA runtime API (driver_types.h); stable since CUDA 10.
MEMCPY_HOST_TO_DEVICE = 1
MEMCPY_DEVICE_TO_HOST = 2
MEMCPY_DEVICE_TO_DEVICE = 3
STREAM_NON_BLOCKING = 0x01
CAPTURE_MODE_THREAD_LOCAL = 1  # only this thread's unsafe calls are refused during a capture
ATTR_CC_MAJOR = 75  # cudaDevAttrComputeCapabilityMajor
ATTR_CC_MINOR = 76  # cudaDevAttrComputeCapabilityMinor
ATTR_INTEGRATED = 18  # cudaDevAttrIntegrated: 1 on an integrated GPU sharing host memory (Jetson, DRIVE)
_PROPS_BYTES = 16384  # cudaDeviceProp is ~1 KiB in CUDA 12; `char name[256]` is its first field in every version


class CudaError(TiDARError):
    """A CUDA runtime call failed (out of memory, no device, driver too old, ...)."""


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "major.minor", e.g. "9.0"
    integrated: bool = False  # an integrated GPU (Jetson / DRIVE: JetPack), not a discrete one


def _candidates() -> list[str]:
    if os.environ.get("TIDAR_CUDART"):
        return [os.environ["TIDAR_CUDART"]]
    if sys.platform.startswith("win"):
        names = ["cudart64_13.dll", "cudart64_12.dll", "cudart64_110.dll"]
    else:
        names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
    wheel_dirs = []
    for base in sys.path:  # pip wheels: nvidia-cuda-runtime-cu12 and friends
        for sub in ("nvidia/cuda_runtime/lib", "nvidia/cuda_runtime/bin", "nvidia/cu13/lib"):
            wheel_dirs += sorted(glob.glob(os.path.join(base, sub, "*cudart*")), reverse=True)
    return names + wheel_dirs


def _open_library() -> ctypes.CDLL:
    tried = []
    for name in _candidates():
        try:
            return ctypes.CDLL(name)
        except OSError:
            tried.append(os.path.basename(name))
    raise TiDARError(f"the CUDA runtime library was not found (tried {', '.join(tried)}); "
                     "install the NVIDIA driver and CUDA runtime, or set TIDAR_CUDART to libcudart's path")


_P, _S, _I = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
_SIGNATURES = {  # name: argument types (all return cudaError_t as int)
    "cudaSetDevice": [_I],
    "cudaGetDeviceCount": [ctypes.POINTER(_I)],
    "cudaDeviceGetAttribute": [ctypes.POINTER(_I), _I, _I],
    "cudaRuntimeGetVersion": [ctypes.POINTER(_I)],
    "cudaMemGetInfo": [ctypes.POINTER(_S), ctypes.POINTER(_S)],
    "cudaMalloc": [ctypes.POINTER(_P), _S],
    "cudaFree": [_P],
    "cudaHostAlloc": [ctypes.POINTER(_P), _S, ctypes.c_uint],
    "cudaFreeHost": [_P],
    "cudaMemsetAsync": [_P, _I, _S, _P],
    "cudaMemcpyAsync": [_P, _P, _S, _I, _P],
    "cudaMemcpy2DAsync": [_P, _S, _P, _S, _S, _S, _I, _P],
    "cudaStreamCreateWithFlags": [ctypes.POINTER(_P), ctypes.c_uint],
    "cudaStreamDestroy": [_P],
    "cudaStreamSynchronize": [_P],
    "cudaStreamBeginCapture": [_P, _I],
    "cudaStreamEndCapture": [_P, ctypes.POINTER(_P)],
    "cudaGraphInstantiateWithFlags": [ctypes.POINTER(_P), _P, ctypes.c_ulonglong],
    "cudaGraphLaunch": [_P, _P],
    "cudaGraphDestroy": [_P],
    "cudaGraphExecDestroy": [_P],
}


class Cuda:
    """Thin checked wrappers; one instance per process (see `load`)."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [_I], ctypes.c_char_p
        # cudaGetDeviceProperties became cudaGetDeviceProperties_v2 in CUDA 12 (same leading name field)
        self._props = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
        self._props.argtypes, self._props.restype = [ctypes.c_char_p, _I], ctypes.c_int

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            msg = self._lib.cudaGetErrorString(status)
            raise CudaError(f"{call} failed: {msg.decode() if msg else 'error ' + str(status)}")

    def _call(self, name: str, *args) -> None:
        self._check(getattr(self._lib, name)(*args), name)

    def _out(self, name: str, ctype, *args):
        value = ctype()
        self._call(name, ctypes.byref(value), *args)
        return value.value

    # -- device -------------------------------------------------------------------------------
    def set_device(self, device: int) -> None:
        count = self._out("cudaGetDeviceCount", _I)
        if not 0 <= device < count:
            raise CudaError(f"CUDA device {device} does not exist ({count} visible)")
        self._call("cudaSetDevice", device)

    def device_info(self, device: int) -> DeviceInfo:
        major = self._out("cudaDeviceGetAttribute", _I, ATTR_CC_MAJOR, device)
        minor = self._out("cudaDeviceGetAttribute", _I, ATTR_CC_MINOR, device)
        integrated = self._out("cudaDeviceGetAttribute", _I, ATTR_INTEGRATED, device)
        buf = ctypes.create_string_buffer(_PROPS_BYTES)
        self._check(self._props(buf, device), "cudaGetDeviceProperties")
        return DeviceInfo(buf.raw[:256].split(b"\0", 1)[0].decode(errors="replace"), f"{major}.{minor}",
                          bool(integrated))

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current device's memory, as cudaMemGetInfo reports them now."""
        free, total = _S(), _S()
        self._call("cudaMemGetInfo", ctypes.byref(free), ctypes.byref(total))
        return int(free.value), int(total.value)

    def runtime_version(self) -> str:
        v = self._out("cudaRuntimeGetVersion", _I)  # 12040 -> "12.4"
        return f"{v // 1000}.{v % 1000 // 10}"

    # -- memory -------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        return self._out("cudaMalloc", _P, max(1, nbytes)) or 0

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def host_alloc(self, nbytes: int) -> int:
        return self._out("cudaHostAlloc", _P, max(1, nbytes), 0) or 0

    def free_host(self, ptr: int) -> None:
        self._call("cudaFreeHost", ptr)

    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self._call("cudaMemsetAsync", ptr, value, nbytes, stream)

    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self._call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)

    def memcpy2d_async(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,
                       kind: int, stream: int) -> None:
        """`height` rows of `width` bytes, rows `spitch` apart in src and `dpitch` apart in dst."""
        self._call("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, kind, stream)

    # -- streams and graphs -------------------------------------------------------------------
    def stream_create(self) -> int:
        return self._out("cudaStreamCreateWithFlags", _P, STREAM_NON_BLOCKING)

    def stream_destroy(self, stream: int) -> None:
        self._call("cudaStreamDestroy", stream)

    def stream_synchronize(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", stream)

    def begin_capture(self, stream: int) -> None:
        self._call("cudaStreamBeginCapture", stream, CAPTURE_MODE_THREAD_LOCAL)

    def end_capture(self, stream: int) -> int:
        """Ends the capture (always call it after begin_capture) and returns the graph."""
        graph = self._out("cudaStreamEndCapture", _P, stream)
        if not graph:
            raise CudaError("cudaStreamEndCapture returned no graph (the capture was invalidated)")
        return graph

    def graph_instantiate(self, graph: int) -> int:
        return self._out("cudaGraphInstantiateWithFlags", _P, graph, 0)

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        self._call("cudaGraphLaunch", graph_exec, stream)

    def graph_destroy(self, graph: int) -> None:
        self._call("cudaGraphDestroy", graph)

    def graph_exec_destroy(self, graph_exec: int) -> None:
        self._call("cudaGraphExecDestroy", graph_exec)


def pinned_array(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A numpy view of `prod(shape)` elements of host memory at `ptr` (no copy, no ownership)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


_instance: Cuda | None = None


def load() -> Cuda:
    """The process-wide CUDA runtime wrapper (the library is opened on the first call)."""
    global _instance
    if _instance is None:
        _instance = Cuda(_open_library())
    return _instance
