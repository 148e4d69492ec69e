"""TensorRT backend: runs the engines of a built artifact (manifest + prefill/step/ar_step engines).

Same contract as the ONNX Runtime backend (tidar_runtime.backends.ort); docs/TENSORRT.md has
the design. In short:

- Before anything is deserialized, each engine's TensorRT version and compute capability
  (from the manifest's `engine_info`) are checked against this machine: a mismatch is a
  one-line error naming both (`check_engine_compat`).
- Every device buffer is allocated once: the KV cache (one [B, KV, max_len, hd] buffer per
  layer and K/V), the inputs, the outputs, and one activation workspace shared by all
  execution contexts (they never run concurrently: one stream). Tensor addresses are set
  once per context; a pass only copies its inputs in, runs, and copies token ids (and logits
  when sampling) out: one host synchronization per pass.
- KV update, by the manifest's `kv_update`:
  - "slice": the graphs return only the new K/V [B, KV, q, hd] in a scratch buffer; each
    row's q slots are copied to slot L of the cache with one strided device-to-device copy
    (cudaMemcpy2DAsync: KV rows of q*hd elements) per row, layer and K/V: 2 * layers * B
    copies per step, ~q*KV*hd*2 bytes each, a few microseconds of launch cost each.
  - "inplace" (the trt-10.15 graphs: TensorScatter, which TensorRT 10.15 maps to its
    KVCacheUpdate layer): the graphs return the whole cache, and TensorRT requires the output
    to share its memory with the cache input. When the engine reports that aliasing
    (`get_aliased_input_tensor`), present.* is bound to the past buffer: no copy at all.
    Otherwise two cache sets alternate (ping-pong, one execution context and one CUDA graph
    per parity), because binding one buffer as both input and output of a non-aliasing
    engine is undefined.
- CUDA graphs: the static step and ar_step passes run eagerly the first time for each
  context (that run is the warm-up TensorRT asks for before a capture, and its results are
  used), then `execute_async_v3` is captured into a CUDA graph that is replayed afterwards.
  Inputs are copied into the captured buffers before each replay. The prefill (dynamic
  prompt length) always runs eagerly. A context that cannot be captured runs eagerly, and
  `cuda_graph_status` says why.

AR mode reuses the TiDAR prefill engine exactly as the ONNX Runtime backend does.
The buffers, the K/V commits, the fetch and the teardown are shared with OrtCudaBackend
(tidar_runtime.backends.device.DeviceBackend); this module binds them to TensorRT.
Importable without TensorRT or CUDA: both are loaded in the constructor.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from tidar_runtime.backends.cuda import CudaError
from tidar_runtime.backends.device import DeviceBackend, load_cuda
from tidar_runtime.errors import TiDARError, first_line
from tidar_runtime.loop import Outputs
from tidar_runtime.manifest import GRAPH_KINDS

# TensorRT DataType names -> the manifest's dtype names
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
           "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8e4m3fn"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1,
             "bool": 1, "float8e4m3fn": 1}


def import_tensorrt():
    """The tensorrt module, or a one-line TiDARError saying how to get it."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the Python bindings are there, libnvinfer is not
        detail = "" if isinstance(e, ModuleNotFoundError) else f" ({first_line(e)})"
        raise TiDARError(
            "TensorRT is not installed: pip install tensorrt (needs NVIDIA's package index / a GPU machine)"
            f"{detail}; the ONNX Runtime backend runs the same artifact without it") from None
    return tensorrt


@dataclass(frozen=True)
class Platform:
    tensorrt: str  # tensorrt.__version__, e.g. "10.15.1.29"
    gpu: str  # device name, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "major.minor", e.g. "9.0"


def _version(text) -> tuple[int, ...]:
    parts = []
    for p in str(text).split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def _same_version(a: str, b: str) -> bool:
    """Equal versions; "10.3.0" (some packagings) matches "10.3.0.26" (the wheels, with a build number)."""
    ta, tb = _version(a), _version(b)
    n = min(len(ta), len(tb))
    return a == b or (n >= 3 and ta[:n] == tb[:n])


def check_engine_compat(kind: str, info: dict, running: Platform) -> None:
    """Refuse, in one line, an engine this machine cannot deserialize (checked before trying).

    A plain engine runs only on the TensorRT version that built it and on GPUs of the same
    compute capability. `version_compatible` engines also run on later TensorRT versions;
    `hardware_compat: "ampere+"` engines on any GPU of compute capability 8.0 or newer.
    """
    built_trt, built_cc = info.get("tensorrt"), info.get("compute_capability")
    if not built_trt or not built_cc:
        raise TiDARError(f"the manifest records no TensorRT version or compute capability for the {kind} "
                         "engine; rebuild the engines with `tidar-export build`")
    version_compat, hw = bool(info.get("version_compatible")), info.get("hardware_compat")
    if version_compat:
        trt_ok = _version(running.tensorrt) >= _version(built_trt)
    else:
        trt_ok = _same_version(running.tensorrt, built_trt)
    if hw == "ampere+":
        cc_ok = _version(running.compute_capability) >= (8, 0)
    else:
        cc_ok = _version(running.compute_capability) == _version(built_cc)
    if trt_ok and cc_ok:
        return
    built = (f"TensorRT {built_trt}{' (version-compatible)' if version_compat else ''} for compute capability "
             f"{built_cc}{' (ampere+)' if hw == 'ampere+' else ''} on {info.get('gpu') or 'an unrecorded GPU'}")
    raise TiDARError(
        f"the {kind} engine was built with {built}; this machine runs TensorRT {running.tensorrt} on compute "
        f"capability {running.compute_capability} ({running.gpu}): rebuild the engines here with "
        "`tidar-export build` (--version-compat / --hardware-compat ampere+ make portable engines)")


def _dtype_name(dt) -> str:
    name = str(getattr(dt, "name", dt)).upper().removeprefix("DATATYPE.")
    return _DTYPES.get(name, name.lower())


class TrtBackend(DeviceBackend):
    """The decode loop's Backend over TensorRT engines (attributes and methods as OrtBackend).

    kinds: engines to load; each engine holds its own copy of the weights, so a TiDAR-only
    service can pass ("prefill", "step") and skip the AR baseline's ar_step engine.
    weight_streaming_budget: bytes of weights kept on the GPU for engines built with
    --weight-streaming (None: TensorRT's automatic budget).
    trt_module / cuda_api: substitutes for the tensorrt module and for
    tidar_runtime.backends.cuda.load() (tests run the backend over stand-ins).
    Output arrays are views of page-locked buffers, valid until the next call.
    """

    _what = "TensorRT backend"

    def __init__(self, artifact_dir: str | os.PathLike, *, device: int = 0, kinds=GRAPH_KINDS,
                 cuda_graphs: bool = True, weight_streaming_budget: int | None = None,
                 trt_module=None, cuda_api=None):
        self._closed = True  # nothing to release until the first allocation
        trt = trt_module if trt_module is not None else import_tensorrt()
        cuda_api = load_cuda(cuda_api)
        self._trt, self._cuda = trt, cuda_api
        m = self._read_manifest(artifact_dir)
        self.kinds = tuple(kinds)
        if "prefill" not in self.kinds or not set(self.kinds) <= set(GRAPH_KINDS):
            raise TiDARError(f"kinds must include prefill and name only {', '.join(GRAPH_KINDS)}; got {self.kinds}")
        for kind in self.kinds:
            spec = m.graphs.get(kind)
            if spec is None:
                raise TiDARError(f"{self.dir}: the artifact has no {kind} graph")
            if spec.engine is None:
                raise TiDARError(f"{self.dir}: no TensorRT engine for the {kind} graph; run "
                                 f"`tidar-export build {self.dir}` on a GPU first")
        self.cuda_graphs = cuda_graphs

        cuda_api.set_device(device)
        dev = cuda_api.device_info(device)
        self.platform = Platform(str(trt.__version__), dev.name, dev.compute_capability)
        for kind in self.kinds:  # before deserializing anything
            check_engine_compat(kind, m.graphs[kind].engine_info, self.platform)
        self._engines = self._load_engines(weight_streaming_budget)
        try:
            self._setup_buffers()
        except BaseException:
            self.close()  # release what was allocated before the failure
            raise

    # -- loading ------------------------------------------------------------------------------
    def _load_engines(self, budget: int | None) -> dict:
        trt, m = self._trt, self.manifest
        self._logger = trt.Logger(trt.Logger.WARNING)  # kept: the runtime holds on to it
        self._runtime = trt.Runtime(self._logger)
        if any(m.graphs[k].engine_info.get("version_compatible") for k in self.kinds):
            # Version-compatible plans carry the lean runtime that runs them: host code from the
            # artifact is executed, so only load artifacts you trust (as with any engine).
            self._runtime.engine_host_code_allowed = True
        engines = {}
        for kind in self.kinds:
            spec = m.graphs[kind]
            path = self.dir / spec.engine
            expected, size = spec.engine_info.get("bytes"), path.stat().st_size
            if expected is not None and size != expected:
                raise TiDARError(f"{path} has {size} bytes, the manifest says {expected} (truncated or "
                                 "replaced after the build)")
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise TiDARError(f"{path}: TensorRT {self.platform.tensorrt} could not deserialize it "
                                 "(its log above says why)")
            if spec.engine_info.get("weight_streaming"):
                engine.weight_streaming_budget_v2 = (
                    budget if budget is not None else engine.get_weight_streaming_automatic_budget())
            self._check_bindings(kind, engine)
            engines[kind] = engine
        return engines

    def _check_bindings(self, kind: str, engine) -> None:
        spec, trt = self.manifest.graphs[kind], self._trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        got_in = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        got = (got_in, set(names) - got_in)
        want = ({t.name for t in spec.inputs}, {t.name for t in spec.outputs})
        if got != want:
            diff = sorted((want[0] ^ got[0]) | (want[1] ^ got[1]))
            raise TiDARError(f"{spec.engine}: its bindings differ from the manifest's {kind} graph "
                             f"({', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}); rebuild the engines")
        for t in spec.inputs + spec.outputs:
            dtype = _dtype_name(engine.get_tensor_dtype(t.name))
            if dtype != t.dtype:
                raise TiDARError(f"{spec.engine}: {t.name} is {dtype} in the engine but {t.dtype} in the "
                                 "manifest; rebuild the engines")

    def _aliased(self, kind: str) -> bool:
        """Does the engine write present.* in place into past_key_values.* (KVCacheUpdate)?"""
        query = getattr(self._engines[kind], "get_aliased_input_tensor", None)
        return query is not None and all(query(pres) == past for past, pres in zip(self.past_names, self.present_names))

    # -- buffers and contexts -----------------------------------------------------------------
    def _setup_buffers(self) -> None:
        m, cu, trt = self.manifest, self._cuda, self._trt
        self._contexts, self._graph_exec, self.cuda_graph_status = {}, {}, {}
        self._start_buffers()

        B, b = self.max_batch, self.block_size
        KV, hd = m.model["num_kv_heads"], m.model["head_dim"]
        cached = [k for k in ("step", "ar_step") if k in self.kinds]
        kv_dtype = m.graphs["prefill"].output(self.present_names[0]).dtype
        rb = hd * _ITEMSIZE[kv_dtype]  # bytes of one slot of one head
        lo, _, hi = (tuple(s) for s in self._engines["prefill"].get_tensor_profile_shape("input_ids", 0))
        self.min_prompt, self.max_prompt = int(lo[1]), int(hi[1])

        if m.kv_update == "slice":
            self.kv_mode = "slice"
        else:
            self.kv_mode = "alias" if all(self._aliased(k) for k in cached) else "pingpong"
        sets = 2 if self.kv_mode == "pingpong" else 1
        self._alloc_cache(sets, KV, rb)
        # New K/V land here: the prefill's [1, KV, P + b, hd], and in "slice" mode the steps' [B, KV, q, hd].
        scratch = KV * (self.max_prompt + b) * rb
        if self.kv_mode == "slice":
            scratch = max([scratch] + [B * KV * self._new_len[k] * rb for k in cached])
        self._scratch = {name: self._malloc(scratch) for name in self.present_names}

        self._alloc_io(rows=max([b] + [B * self._rows[k] for k in cached]),
                       ids=max([self.max_prompt] + [B * (b if k == "step" else 1) for k in cached]))

        workspace = max(int(e.device_memory_size_v2) for e in self._engines.values())
        self._workspace = self._malloc(workspace)

        def context(kind: str):
            ctx = self._engines[kind].create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise TiDARError(f"TensorRT could not create an execution context for the {kind} engine")
            ctx.set_device_memory(self._workspace, workspace)
            return ctx

        ctx = self._contexts[("prefill", 0)] = context("prefill")
        self._bind(ctx, {"input_ids": self._d_ids, "token_ids": self._d_tok, "logits": self._d_logits,
                         **{pres: self._scratch[pres] for pres in self.present_names}})
        for kind in cached:
            for parity in range(sets):
                ctx = self._contexts[(kind, parity)] = context(kind)
                past = self._cache[parity]
                if self.kv_mode == "slice":
                    out = self._scratch
                else:  # alias: the same buffers; ping-pong: the other set
                    out_set = self._cache[parity if self.kv_mode == "alias" else 1 - parity]
                    out = {pres: out_set[p] for p, pres in zip(self.past_names, self.present_names)}
                first = "draft_ids" if kind == "step" else "input_ids"
                self._bind(ctx, {first: self._d_ids, "cache_len": self._d_cache_len, "token_ids": self._d_tok,
                                 "logits": self._d_logits, **past, **{pres: out[pres] for pres in self.present_names}})
        cu.stream_synchronize(self._stream)

    @staticmethod
    def _bind(ctx, addresses: dict) -> None:
        for name, ptr in addresses.items():
            if not ctx.set_tensor_address(name, ptr):
                raise TiDARError(f"TensorRT refused the device address of {name}")

    # -- execution ----------------------------------------------------------------------------
    def _execute(self, key: tuple[str, int]) -> None:
        """One enqueue of a static-shape context: graph replay once captured, else eager."""
        graph = self._graph_exec.get(key)
        if graph is not None:
            self._cuda.graph_launch(graph, self._stream)
            return
        ctx = self._contexts[key]
        if not ctx.execute_async_v3(self._stream):
            raise TiDARError(f"TensorRT failed to run the {key[0]} engine (its log above says why)")
        if self.cuda_graphs and key not in self.cuda_graph_status:
            # That eager run was the warm-up TensorRT wants before a capture; capture the next.
            self.cuda_graph_status[key] = self._capture(key, ctx)

    def _capture(self, key: tuple[str, int], ctx) -> str:
        capturable = getattr(ctx, "is_stream_capturable", None)  # TensorRT >= 10.14
        if capturable is not None and not capturable(self._stream):
            return "eager: TensorRT reports this context cannot be stream-captured"
        cu = self._cuda
        cu.begin_capture(self._stream)
        try:
            ok = bool(ctx.execute_async_v3(self._stream))
        finally:
            graph, error = self._end_capture()
        if not ok or graph is None:
            if graph is not None:
                cu.graph_destroy(graph)
            reason = error or "execute_async_v3 failed during the capture"
            warnings.warn(f"{key[0]}: CUDA graph capture failed ({reason}); this pass runs without a graph")
            return f"eager: {reason}"
        try:
            self._graph_exec[key] = cu.graph_instantiate(graph)
        finally:
            cu.graph_destroy(graph)  # the executable graph does not need its template
        return "captured"

    def _end_capture(self) -> tuple[int | None, str | None]:
        try:
            return self._cuda.end_capture(self._stream), None
        except CudaError as e:  # an invalidated capture: reported by _capture, which falls back to eager
            return None, str(e)

    def prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        self._check_open()
        prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
        P = prompt.size
        if not self.min_prompt <= P <= self.max_prompt:
            raise TiDARError(f"a prompt of {P} tokens is outside the prefill engine's profile "
                             f"({self.min_prompt}..{self.max_prompt} tokens)")
        if not 0 <= row < self.max_batch:
            raise TiDARError(f"row {row} is outside the artifact's batch of {self.max_batch}")
        self._upload_ids(prompt)
        ctx = self._contexts[("prefill", 0)]
        if not ctx.set_input_shape("input_ids", (1, P)):
            raise TiDARError(f"TensorRT refused the prefill input shape (1, {P})")
        if not ctx.execute_async_v3(self._stream):
            raise TiDARError("TensorRT failed to run the prefill engine (its log above says why)")
        self._commit_prefill_kv(row, P)
        return self._fetch(1, self._rows["prefill"], want_logits)

    def _run_cached(self, kind: str, ids: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        self._check_open()
        if kind not in self.kinds:
            raise TiDARError(f"the {kind} engine was not loaded (TrtBackend kinds={self.kinds})")
        B = self.max_batch
        width = self.block_size if kind == "step" else 1
        ids = np.asarray(ids, dtype=np.int64)
        cache_len = np.asarray(cache_len, dtype=np.int64).reshape(-1)
        if ids.shape != (B, width) or cache_len.shape != (B,):
            raise TiDARError(f"{kind}: expected ids [{B}, {width}] and cache_len [{B}], got "
                             f"{list(ids.shape)} and {list(cache_len.shape)}")
        self._upload_step_inputs(ids, cache_len)
        self._execute((kind, self._parity))
        self._commit_step_kv(kind, cache_len)  # "slice": each row's new K/V at its L; "pingpong": swap sets
        return self._fetch(B, self._rows[kind], want_logits)

    # -- teardown (close: DeviceBackend) ------------------------------------------------------
    def _release(self) -> None:
        """CUDA graphs, then contexts (before the workspace they use and the engines they belong
        to), then engines."""
        for graph in self._graph_exec.values():
            self._cuda.graph_exec_destroy(graph)
        self._graph_exec.clear()
        self._contexts.clear()
        self._engines.clear()
