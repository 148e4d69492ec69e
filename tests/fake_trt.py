"""Stand-ins for TensorRT and the CUDA runtime, so TrtBackend's logic runs on a CPU machine.

They implement exactly the API surface TrtBackend and build_engines use, with the semantics
that matter for correctness:
- FakeCuda: "device" and pinned memory are host allocations, tracked, so every copy is checked
  to stay inside an allocation of the right kind (device vs host) and every free to match an
  allocation. Work on a stream runs at once, except between begin_capture and end_capture,
  where it is only recorded (as a real capture records, not executes); a graph launch replays
  the recording. Synchronizations and launches are counted.
- fake_tensorrt(): engines whose execution runs the artifact's ONNX graph in ONNX Runtime,
  reading inputs from and writing outputs to the bound addresses as they were when the work
  was enqueued (a captured graph keeps the addresses of its capture). An aliasing engine
  (KVCacheUpdate in TensorRT 10.15) insists that present.* share the past buffers; a
  non-aliasing one refuses any output bound over an input.
What they cannot show: TensorRT's own numerics, its ONNX parser, real stream capture rules.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import types

import numpy as np

from tidar_runtime.backends.cuda import (
    MEMCPY_DEVICE_TO_DEVICE,
    MEMCPY_DEVICE_TO_HOST,
    MEMCPY_HOST_TO_DEVICE,
    DeviceInfo,
    pinned_array,
)
from tidar_runtime.backends.trt import Platform, host_cpu_arch, host_os

FAKE_PLATFORM = Platform("10.15.1.29", "Fake GPU", "9.0", host_os(), host_cpu_arch(), False)
_KINDS = {MEMCPY_HOST_TO_DEVICE: ("host", "device"), MEMCPY_DEVICE_TO_HOST: ("device", "host"),
          MEMCPY_DEVICE_TO_DEVICE: ("device", "device")}


class FakeCuda:
    def __init__(self, device_info: DeviceInfo = DeviceInfo(FAKE_PLATFORM.gpu, FAKE_PLATFORM.compute_capability),
                 free_bytes: int = 80 << 30, total_bytes: int = 80 << 30):
        self.info = device_info
        # what mem_get_info reports: a GPU's memory, not these host-backed allocations
        self.free_bytes, self.total_bytes = free_bytes, total_bytes
        self.memory = {"device": {}, "host": {}}  # space -> {address: buffer}
        self.streams: set[int] = set()
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self._ids = itertools.count(1)
        self._capture: tuple[int, list] | None = None  # (stream, recorded work)
        self.syncs = self.launches = self.copies_2d = 0

    # -- memory
    def _alloc(self, space: str, nbytes: int) -> int:
        buf = (ctypes.c_char * max(1, nbytes))()
        self.memory[space][ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def _release(self, space: str, ptr: int) -> None:
        if ptr not in self.memory[space]:
            raise AssertionError(f"free of {ptr:#x}, which is no {space} allocation")
        del self.memory[space][ptr]

    def check(self, ptr: int, nbytes: int, space: str) -> None:
        for base, buf in self.memory[space].items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return
        raise AssertionError(f"{nbytes} bytes at {ptr:#x} lie outside every {space} allocation")

    def malloc(self, nbytes: int) -> int:
        return self._alloc("device", nbytes)

    def free(self, ptr: int) -> None:
        self._release("device", ptr)

    def host_alloc(self, nbytes: int) -> int:
        return self._alloc("host", nbytes)

    def free_host(self, ptr: int) -> None:
        self._release("host", ptr)

    # -- streams
    def enqueue(self, stream: int, work) -> None:
        assert stream in self.streams, "work on an unknown stream"
        if self._capture is not None and self._capture[0] == stream:
            self._capture[1].append(work)
        else:
            work()

    def memset_async(self, ptr, value, nbytes, stream):
        self.check(ptr, nbytes, "device")
        self.enqueue(stream, lambda: ctypes.memset(ptr, value, nbytes))

    def memcpy_async(self, dst, src, nbytes, kind, stream):
        src_space, dst_space = _KINDS[kind]
        self.check(src, nbytes, src_space)
        self.check(dst, nbytes, dst_space)
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, nbytes))

    def memcpy2d_async(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert width <= dpitch and width <= spitch, "cudaMemcpy2D needs width <= both pitches"
        src_space, dst_space = _KINDS[kind]
        self.check(src, (height - 1) * spitch + width, src_space)
        self.check(dst, (height - 1) * dpitch + width, dst_space)
        self.copies_2d += 1

        def work():
            for r in range(height):
                ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        self.enqueue(stream, work)

    def stream_create(self) -> int:
        s = next(self._ids)
        self.streams.add(s)
        return s

    def stream_destroy(self, stream: int) -> None:
        self.streams.remove(stream)

    def stream_synchronize(self, stream: int) -> None:
        assert self._capture is None, "synchronize during a capture"
        self.syncs += 1

    def begin_capture(self, stream: int) -> None:
        assert self._capture is None
        self._capture = (stream, [])

    def end_capture(self, stream: int) -> int:
        assert self._capture is not None and self._capture[0] == stream
        g = next(self._ids)
        self.graphs[g], self._capture = self._capture[1], None
        return g

    def graph_instantiate(self, graph: int) -> int:
        e = next(self._ids)
        self.execs[e] = list(self.graphs[graph])
        return e

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        self.launches += 1
        for work in self.execs[graph_exec]:
            self.enqueue(stream, work)

    def graph_destroy(self, graph: int) -> None:
        del self.graphs[graph]

    def graph_exec_destroy(self, graph_exec: int) -> None:
        del self.execs[graph_exec]

    # -- device
    def set_device(self, device: int) -> None:
        assert device == 0

    def device_info(self, device: int) -> DeviceInfo:
        return self.info

    def mem_get_info(self) -> tuple[int, int]:
        return self.free_bytes, self.total_bytes

    def live_allocations(self) -> int:
        return len(self.memory["device"]) + len(self.memory["host"])


class FakeCompiler:
    """build_engines' compiler: the "engine" names its ONNX file and profile (JSON)."""

    def __init__(self, platform: Platform = FAKE_PLATFORM, fail_on: str | None = None):
        self._platform, self.fail_on, self.compiled = platform, fail_on, []

    def platform(self) -> Platform:
        return self._platform

    def compile(self, settings, graph) -> bytes:
        if graph.kind == self.fail_on:
            raise RuntimeError(f"simulated build failure of {graph.kind}")
        self.compiled.append(graph.kind)
        spec = {"onnx": str(settings.artifact_dir / graph.onnx), "profile": graph.profile}
        if settings.weight_streaming:  # all of the artifact's weights are streamable in the stand-in
            spec["streamable"] = (settings.artifact_dir / "weights.bin").stat().st_size
        return json.dumps(spec).encode()


_ORT_TYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64",
              "tensor(int32)": "INT32", "tensor(bool)": "BOOL"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}


def fake_tensorrt(cuda: FakeCuda, aliased: bool = True, version: str = FAKE_PLATFORM.tensorrt,
                  refuse_budgets: bool = False):
    """A module-like stand-in for `tensorrt` whose engines run in ONNX Runtime over `cuda`'s memory.

    Engines built with weight streaming have TensorRT's budget API: `streamable_weights_size`,
    `weight_streaming_budget_v2` (a property whose setter, like TensorRT's Python binding, cannot
    report a failure: with refuse_budgets it silently keeps the old value), a scratch that
    `device_memory_size_v2` includes while streaming, and `get_weight_streaming_automatic_budget`,
    which fails the test if called (its binding returns int32: budgets >= 2 GiB wrap).
    """
    import onnxruntime as ort

    trt = types.SimpleNamespace(__version__=version, deserialized=0)
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})

    class Context:
        def __init__(self, engine):
            self.engine, self.addresses, self.shapes, self.memory = engine, {}, {}, None

        def set_device_memory(self, ptr, size):
            cuda.check(ptr, size, "device")
            self.memory = ptr

        def set_tensor_address(self, name, ptr):
            if name not in self.engine.modes:
                return False
            self.addresses[name] = ptr
            return True

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profile[name]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def execute_async_v3(self, stream):
            if self.memory is None or set(self.addresses) != set(self.engine.modes):
                return False
            addresses, shapes = dict(self.addresses), dict(self.shapes)  # baked in, as in a captured graph
            cuda.enqueue(stream, lambda: self.engine.run(addresses, shapes))
            return True

    class Engine:
        def __init__(self, spec):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # ORT warns on every TensorScatter that is not in place
            self.session = ort.InferenceSession(spec["onnx"], opts, providers=["CPUExecutionProvider"])
            self.profile = {k: [tuple(s) for s in v] for k, v in spec["profile"].items()}
            io = [(t, "INPUT") for t in self.session.get_inputs()] + [(t, "OUTPUT") for t in self.session.get_outputs()]
            self.names = [t.name for t, _ in io]
            self.modes = {t.name: mode for t, mode in io}
            self.dtypes = {t.name: _ORT_TYPES[t.type] for t, _ in io}
            self.num_io_tensors = len(self.names)
            self._activations = 4096
            if "streamable" in spec:
                self.streamable_weights_size = spec["streamable"]
                self._budget = spec["streamable"]  # TensorRT's default: no streaming

        @property
        def device_memory_size_v2(self):
            streaming = hasattr(self, "_budget") and self._budget < self.streamable_weights_size
            return self._activations + (self.weight_streaming_scratch_memory_size if streaming else 0)

        @property
        def weight_streaming_scratch_memory_size(self):
            return 2048

        @property
        def weight_streaming_budget_v2(self):
            return self._budget

        @weight_streaming_budget_v2.setter
        def weight_streaming_budget_v2(self, value):
            assert isinstance(value, int), f"budget {value!r} is no int"
            if not refuse_budgets and value >= 0:
                self._budget = value

        def get_weight_streaming_automatic_budget(self):
            raise AssertionError("the automatic budget was asked for (int32 in the Python binding)")

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return self.modes[name]

        def get_tensor_dtype(self, name):
            return types.SimpleNamespace(name=self.dtypes[name])

        def get_tensor_profile_shape(self, name, profile_index):
            assert profile_index == 0
            return self.profile[name]

        def create_execution_context(self, strategy):
            assert strategy == "USER_MANAGED"
            return Context(self)

        def run(self, addresses, shapes):
            feeds = {}
            for name in self.session.get_inputs():
                name = name.name
                shape = shapes.get(name, self.profile[name][0])
                dtype = _NP[self.dtypes[name]]
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                cuda.check(addresses[name], nbytes, "device")
                feeds[name] = pinned_array(addresses[name], shape, dtype).copy()
            inputs = {addresses[n] for n in feeds}
            for out, value in zip(self.session.get_outputs(), self.session.run(None, feeds)):
                ptr = addresses[out.name]
                past = out.name.replace("present.", "past_key_values.")
                if aliased and past in feeds:
                    assert ptr == addresses[past], f"{out.name} must share the memory of {past} (KVCacheUpdate)"
                elif not aliased:
                    assert ptr not in inputs, f"{out.name} is bound over an input of a non-aliasing engine"
                cuda.check(ptr, value.nbytes, "device")
                np.copyto(pinned_array(ptr, value.shape, value.dtype), value)

    class AliasingEngine(Engine):
        def get_aliased_input_tensor(self, name):
            past = name.replace("present.", "past_key_values.")
            return past if name.startswith("present.") and past in self.modes else None

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, blob):
            trt.deserialized += 1
            return (AliasingEngine if aliased else Engine)(json.loads(blob))

    trt.Runtime = Runtime
    return trt
