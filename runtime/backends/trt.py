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
import platform
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from tidar_runtime.backends.cuda import CudaError
from tidar_runtime.backends.device import DeviceBackend, load_cuda
from tidar_runtime.errors import TiDARError, first_line
from tidar_runtime.loop import Outputs
from tidar_runtime.contract import (CACHE_LEN, CACHED_KINDS, GRAPH_KINDS, INPUT_IDS, ITEMSIZE, LOGITS, TOKEN_IDS,
                                    dtype_of_trt, ids_input)


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
    os: str  # "linux" | "windows" (host_os)
    cpu_arch: str  # "x86_64" | "aarch64" (host_cpu_arch)
    integrated_gpu: bool  # Jetson / DRIVE (JetPack): an iGPU sharing host memory


def host_os() -> str:
    return "windows" if sys.platform.startswith("win") else sys.platform.rstrip("0123456789")  # "linux", "darwin"


def host_cpu_arch() -> str:
    arch = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def device_platform(tensorrt_version: str, dev) -> Platform:
    """This machine's Platform for a tidar_runtime.backends.cuda.DeviceInfo."""
    return Platform(str(tensorrt_version), dev.name, dev.compute_capability, host_os(), host_cpu_arch(),
                    bool(dev.integrated))


def _describe(os_name, arch, integrated) -> str:
    return f"{os_name}/{arch} with {'an integrated GPU (JetPack)' if integrated else 'a discrete GPU'}"


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

    An engine runs only on the platform that built it: the same OS, CPU architecture and kind
    of GPU (integrated, i.e. Jetson/JetPack, or discrete); TensorRT documents hardware
    compatibility as unsupported on JetPack, so an x86 engine never runs on a Jetson, whatever
    its compute capability. On that platform a plain engine needs the TensorRT version that
    built it and a GPU of the same compute capability. `version_compatible` engines also run on
    later TensorRT versions; `hardware_compat: "ampere+"` engines on any discrete GPU of
    compute capability 8.0 or newer.
    """
    built_trt, built_cc = info.get("tensorrt"), info.get("compute_capability")
    if not built_trt or not built_cc:
        raise TiDARError(f"the manifest records no TensorRT version or compute capability for the {kind} "
                         "engine; rebuild the engines with `tidar-export build`")
    built_on = (info.get("os"), info.get("cpu_arch"), info.get("integrated_gpu"))
    if None in built_on:
        raise TiDARError(f"the manifest records no build platform (OS, CPU architecture, integrated or discrete "
                         f"GPU) for the {kind} engine; rebuild the engines with `tidar-export build`")
    here = (running.os, running.cpu_arch, running.integrated_gpu)
    if built_on != here:
        raise TiDARError(f"the {kind} engine was built on {_describe(*built_on)}; this machine is "
                         f"{_describe(*here)} ({running.gpu}): TensorRT engines do not move between platforms, "
                         "rebuild the engines here with `tidar-export build`")
    version_compat, hw = bool(info.get("version_compatible")), info.get("hardware_compat")
    if hw == "ampere+" and running.integrated_gpu:
        raise TiDARError(f"the {kind} engine was built with hardware compatibility (ampere+), which TensorRT does "
                         "not support on JetPack (integrated GPUs): rebuild plain engines on this device with "
                         "`tidar-export build`")
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


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if abs(nbytes) >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def plan_weight_streaming(streamable: dict[str, int], available: int) -> dict[str, int] | None:
    """Budgets (bytes of streamable weights kept on the GPU) for the streaming engines, from the
    `available` bytes left after everything else; None when nothing is left.

    The step engine runs every TiDAR decode step, so it is served first, then ar_step (the AR
    baseline's every token), then the prefill (once per request); each gets all of its
    streamable weights (no streaming) while the memory lasts, and the first that does not fit
    streams the rest.
    """
    if available < 0:
        return None
    budgets = {}
    for kind in sorted(streamable, key=lambda k: ("step", "ar_step", "prefill").index(k)):
        budgets[kind] = min(streamable[kind], available)
        available -= budgets[kind]
    return budgets


def _dtype_name(dt) -> str:
    return dtype_of_trt(str(getattr(dt, "name", dt)).upper().removeprefix("DATATYPE."))


class TrtBackend(DeviceBackend):
    """The decode loop's Backend over TensorRT engines (attributes and methods as OrtBackend).

    kinds: engines to load; each engine holds its own copy of the weights, so a TiDAR-only
    service can pass ("prefill", "step") and skip the AR baseline's ar_step engine.
    weight_streaming_budget: for engines built with --weight-streaming, the bytes of streamable
    weights each keeps on the GPU: an int for every such engine, or {kind: bytes}; None (the
    default) computes them from the free memory and what this backend allocates
    (`plan_weight_streaming`). Each budget is read back after it is set: TensorRT's setter
    fails silently.
    weight_streaming_headroom: bytes left free for what cannot be counted before the engines
    run (the CUDA context's growth, TensorRT's and the libraries' own allocations, the
    weight-streaming scratch); None: 256 MiB + 2% of the device memory.
    trt_module / cuda_api: substitutes for the tensorrt module and for
    tidar_runtime.backends.cuda.load() (tests run the backend over stand-ins).
    Output arrays are views of page-locked buffers, valid until the next call.
    """

    _what = "TensorRT backend"

    def __init__(self, artifact_dir: str | os.PathLike, *, device: int = 0, kinds=GRAPH_KINDS,
                 cuda_graphs: bool = True, weight_streaming_budget: int | dict | None = None,
                 weight_streaming_headroom: int | None = None, trt_module=None, cuda_api=None):
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
        self.platform = device_platform(trt.__version__, dev)
        for kind in self.kinds:  # before deserializing anything
            check_engine_compat(kind, m.graphs[kind].engine_info, self.platform)
        streaming = [k for k in self.kinds if m.graphs[k].engine_info.get("weight_streaming")]
        # Free memory before any engine or buffer of this backend is on the device: the budgets'
        # starting point (an automatic budget read later would see only what is left then).
        memory = cuda_api.mem_get_info() if streaming else None
        self._engines = self._load_engines()
        self.weight_streaming: dict[str, dict] = {}  # kind -> {"streamable", "budget", "streams"}
        self.memory_plan: dict[str, int | None] = {}  # the byte counts the budgets were computed from
        try:
            plan = self._plan_buffers()
            if streaming:
                self.weight_streaming = self._set_budgets(streaming, weight_streaming_budget, memory, plan,
                                                          weight_streaming_headroom)
            self._setup_buffers(plan)
        except BaseException:
            self.close()  # release what was allocated before the failure
            raise

    # -- loading ------------------------------------------------------------------------------
    def _load_engines(self) -> dict:
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

    # -- weight streaming ---------------------------------------------------------------------
    def _set_budgets(self, streaming: list[str], given, memory: tuple[int, int], plan: dict,
                     headroom: int | None) -> dict[str, dict]:
        """Set each streaming engine's `weight_streaming_budget_v2`, read it back, and check that
        the whole plan fits the free memory. Returns {kind: {"streamable", "budget", "streams"}}.

        TensorRT's automatic budget is never used: its Python binding returns int32 (a budget of
        2 GiB or more wraps), and it is "close to the free memory" when asked, before the KV
        cache and the other engines are allocated.
        """
        free, total = memory
        engines, infos = self._engines, {k: self.manifest.graphs[k].engine_info for k in self.kinds}
        streamable = {k: int(engines[k].streamable_weights_size) for k in streaming}
        # On the device whatever the budgets: every engine's non-streamable part (its plan minus the
        # streamable weights; a whole plan for an engine without streaming), this backend's buffers
        # and the shared activation workspace as the engines report it before streaming.
        resident = sum(max(0, int(infos[k].get("bytes") or 0) - streamable.get(k, 0)) for k in self.kinds)
        workspace = max(int(e.device_memory_size_v2) for e in engines.values())
        if headroom is None:
            headroom = (256 << 20) + total // 50
        if given is None:
            budgets = plan_weight_streaming(streamable, free - resident - plan["device_bytes"] - workspace - headroom)
            if budgets is None:
                need = resident + plan["device_bytes"] + workspace + headroom
                raise TiDARError(
                    f"not enough GPU memory for the {', '.join(self.kinds)} engines: besides their streamed weights they "
                    f"need {_gib(need)} (non-streamable weights {_gib(resident)}, KV cache and buffers "
                    f"{_gib(plan['device_bytes'])}, workspace {_gib(workspace)}, headroom {_gib(headroom)}); "
                    f"{_gib(free)} are free")
        else:
            budgets = {}
            for k in streaming:
                value = given.get(k) if isinstance(given, dict) else given
                if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise TiDARError(f"weight_streaming_budget for the {k} engine must be a byte count >= 0, "
                                     f"got {value!r}")
                budgets[k] = min(value, streamable[k])  # more than the streamable size: no streaming
        self.memory_plan = {"free": free, "resident_weights": resident, "buffers": plan["device_bytes"],
                            "workspace": workspace, "headroom": headroom if given is None else None}
        result = {}
        for k in streaming:
            engines[k].weight_streaming_budget_v2 = budgets[k]
            got = int(engines[k].weight_streaming_budget_v2)  # the property's setter cannot report a failure
            if got != budgets[k]:
                raise TiDARError(f"TensorRT did not take the weight-streaming budget of {budgets[k]} bytes for the {k} "
                                 f"engine (it reports {got}; streamable weights {streamable[k]} bytes)")
            result[k] = {"streamable": streamable[k], "budget": budgets[k], "streams": budgets[k] < streamable[k]}
        workspace = max(int(e.device_memory_size_v2) for e in engines.values())  # now with the streaming scratch
        need = resident + sum(budgets.values()) + plan["device_bytes"] + workspace
        if need > free:
            raise TiDARError(f"the weight-streaming budgets ({_gib(sum(budgets.values()))}) leave too little GPU memory: "
                             f"the engines and buffers need {_gib(need)}, {_gib(free)} are free")
        return result

    # -- buffers and contexts -----------------------------------------------------------------
    def _plan_buffers(self) -> dict:
        """The KV mode and every buffer's size (nothing allocated); "device_bytes": their sum
        without the activation workspace."""
        m = self.manifest
        B, b = self.max_batch, self.block_size
        KV, hd = m.num_kv_heads, m.head_dim
        cached = [k for k in CACHED_KINDS if k in self.kinds]
        kv_dtype = m.graphs["prefill"].output(self.present_names[0]).dtype
        rb = hd * ITEMSIZE[kv_dtype]  # bytes of one slot of one head
        lo, _, hi = (tuple(s) for s in self._engines["prefill"].get_tensor_profile_shape(INPUT_IDS, 0))
        self.min_prompt, self.max_prompt = int(lo[1]), int(hi[1])
        if len({m.graphs[k].kv_update for k in CACHED_KINDS}) != 1:
            raise TiDARError(f"{self.dir}: the step and ar_step graphs write the cache differently "
                             f"(target {m.target}); TensorRT engines are built from trt-* artifacts")
        if m.graphs["step"].kv_update == "slice":
            self.kv_mode = "slice"
        else:
            self.kv_mode = "alias" if all(self._aliased(k) for k in cached) else "pingpong"
        self.kv_modes = dict.fromkeys(CACHED_KINDS, self.kv_mode)  # one mode for both graphs here
        sets = 2 if self.kv_mode == "pingpong" else 1
        # New K/V land in scratch: the prefill's [1, KV, P + b, hd], and in "slice" mode the steps' [B, KV, q, hd].
        scratch = KV * (self.max_prompt + b) * rb
        if self.kv_mode == "slice":
            scratch = max([scratch] + [B * KV * self._new_len[k] * rb for k in cached])
        rows = max([b] + [B * self._rows[k] for k in cached])
        ids = max([self.max_prompt] + [B * (b if k == "step" else 1) for k in cached])
        n_kv = len(self.present_names)
        device_bytes = (sets * n_kv * B * KV * self.max_len * rb + n_kv * scratch
                        + rows * 8 + rows * self.vocab_size * 4 + ids * 8 + B * 8)  # as DeviceBackend._alloc_io
        return {"cached": cached, "sets": sets, "kv_heads": KV, "row_bytes": rb, "scratch": scratch, "rows": rows,
                "ids": ids, "device_bytes": device_bytes}

    def _setup_buffers(self, plan: dict) -> None:
        cu, trt = self._cuda, self._trt
        self._contexts, self._graph_exec, self.cuda_graph_status = {}, {}, {}
        self._start_buffers()
        cached, sets = plan["cached"], plan["sets"]
        self._alloc_cache(sets, plan["kv_heads"], plan["row_bytes"])
        self._scratch = {name: self._malloc(plan["scratch"]) for name in self.present_names}
        self._alloc_io(rows=plan["rows"], ids=plan["ids"])

        workspace = max(int(e.device_memory_size_v2) for e in self._engines.values())
        self._workspace = self._malloc(workspace)

        def context(kind: str):
            ctx = self._engines[kind].create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise TiDARError(f"TensorRT could not create an execution context for the {kind} engine")
            ctx.set_device_memory(self._workspace, workspace)
            return ctx

        ctx = self._contexts[("prefill", 0)] = context("prefill")
        self._bind(ctx, {INPUT_IDS: self._d_ids, TOKEN_IDS: self._d_tok, LOGITS: self._d_logits,
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
                self._bind(ctx, {ids_input(kind): self._d_ids, CACHE_LEN: self._d_cache_len, TOKEN_IDS: self._d_tok,
                                 LOGITS: self._d_logits, **past, **{pres: out[pres] for pres in self.present_names}})
                ws = self.weight_streaming.get(kind)
                if self.cuda_graphs and ws and ws["streams"]:
                    # TensorRT: "If the Engine is streaming weights, enqueueV3 will become synchronous,
                    # and the graph will not be capturable" (IExecutionContext::enqueueV3).
                    self.cuda_graph_status[(kind, parity)] = (
                        f"eager: the engine streams weights (budget {ws['budget']} of {ws['streamable']} bytes), "
                        "and TensorRT's enqueue is synchronous and not capturable then")
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
        if not ctx.set_input_shape(INPUT_IDS, (1, P)):
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
