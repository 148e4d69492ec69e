"""ONNX Runtime on a GPU (CUDA execution provider) with a device-resident KV cache.

Same contract as OrtBackend (tidar_runtime.backends.ort) and the same buffer plan as
TrtBackend (docs/RUNTIME.md):

- Every device buffer is allocated once in `__init__` through the ctypes CUDA helper
  (tidar_runtime.backends.cuda): the KV cache [B, KV, max_len, hd] per layer and K/V, scratch
  for the new K/V, the inputs, the token ids and logits; the
  host side is pinned memory. Buffers are bound to ONNX Runtime by address (I/O binding), and
  the bindings of the static step graphs are made once, so a pass never allocates.
- ONNX Runtime runs on this backend's own CUDA stream (`user_compute_stream`) and is told not
  to synchronize at the end of a run (`disable_synchronize_execution_providers`). A pass
  enqueues the input copies, the run, the K/V writes of a "slice" graph (one strided copy per
  row, layer and K/V, at the row's L; an "inplace" graph's present.* are bound to the cache
  buffers themselves, "alias": GroupQueryAttention in the ort AR step needs that) and the copy
  of the token ids (and of the logits only when sampling) on that one stream, then
  synchronizes once.
- CUDA graphs: ONNX Runtime's own capture (`enable_cuda_graph`) for the step and ar_step
  sessions, whose bindings never move. If ONNX Runtime
  refuses (a node not placed on the CUDA provider), the session runs without a graph and
  `cuda_graph_status` says why.

The buffers, the K/V commits, the fetch and the teardown are shared with TrtBackend
(tidar_runtime.backends.device.DeviceBackend); this module binds them to ONNX Runtime.

Written against ONNX Runtime's documented Python API (IOBinding.bind_input/bind_output with
raw addresses, CUDA provider options, run config entries); it runs only where
onnxruntime-gpu and a GPU exist. Its buffer logic is tested on CPU with `ort_device="cpu"`
and a stand-in CUDA API whose "device" memory is host memory (tests/test_runtime.py).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from tidar_runtime.backends.device import DeviceBackend, load_cuda
from tidar_runtime.backends.ort import np_dtype
from tidar_runtime.contract import CACHE_LEN, CACHED_KINDS, INPUT_IDS, LOGITS, TOKEN_IDS, ids_input
from tidar_runtime.errors import TiDARError, first_line
from tidar_runtime.loop import Outputs


def import_ort_cuda():
    """The onnxruntime module, when it has the CUDA provider; else a one-line TiDARError."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise TiDARError("onnxruntime is not installed: pip install onnxruntime-gpu") from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise TiDARError("backend ort-cuda needs onnxruntime-gpu and a GPU: this onnxruntime has no CUDA "
                         "provider (pip uninstall onnxruntime && pip install onnxruntime-gpu)")
    return ort


class OrtCudaBackend(DeviceBackend):
    """The decode loop's Backend over ONNX Runtime's CUDA provider (attributes as OrtBackend).

    ort_device / cuda_api: tests only. ort_device="cpu" binds the same buffers as host memory
    to the CPU provider, with cuda_api a stand-in whose "device" allocations are host memory.
    Output arrays are views of pinned buffers, valid until the next call.
    """

    _what = "ONNX Runtime CUDA backend"

    def __init__(self, artifact_dir: str | os.PathLike, *, device: int = 0, cuda_graphs: bool = True,
                 ort_device: str = "cuda", cuda_api=None):
        self._closed = True
        self._ort_device = ort_device
        if ort_device == "cuda":
            ort = import_ort_cuda()
        else:
            import onnxruntime as ort
        cuda_api = load_cuda(cuda_api)  # one-line CudaError without a driver or GPU
        self._ort, self._cuda, self.device = ort, cuda_api, device
        m = self._read_manifest(artifact_dir)
        self.kv_dtype = np_dtype(m.graphs["step"].input(self.past_names[0]).dtype)
        # this backend's buffer scheme per cached graph: "slice" (scratch, then written at L) or "alias"
        self.kv_modes = {kind: "slice" if m.graphs[kind].kv_update == "slice" else "alias" for kind in CACHED_KINDS}
        opset = int((m.versions.get("opsets") or {}).get("ai.onnx", 0))
        if opset >= 24:
            # ONNX opset 24 bumped Reshape and Cast; CUDA-provider builds that register them only up to
            # opset 23 run every Reshape/Cast of these graphs on the CPU, with copies around each.
            warnings.warn(f"{self.dir}: opset-{opset} graphs (target {m.target}) on ONNX Runtime's CUDA provider: "
                          "builds without opset-24 Reshape/Cast CUDA kernels place those nodes on the CPU; "
                          "export with --target ort (opset 23) for the ort-cuda backend")
        self.cuda_graphs = cuda_graphs and ort_device == "cuda"
        self.cuda_graph_status: dict[str, str] = {}
        cuda_api.set_device(device)
        try:
            self._setup_buffers()
            self._setup_sessions()
        except BaseException:
            self.close()
            raise

    # -- buffers ------------------------------------------------------------------------------
    def _setup_buffers(self) -> None:
        m = self.manifest
        self._start_buffers()
        B, b, S = self.max_batch, self.block_size, self.max_len
        KV, hd = m.num_kv_heads, m.head_dim
        self._kv_shape = (B, KV, S, hd)
        rb = hd * np.dtype(self.kv_dtype).itemsize  # bytes of one slot of one head
        self._alloc_cache(1, KV, rb)
        # new K/V: the prefill's [1, KV, P + b, hd] (P <= S), and in "slice" mode the steps' [B, KV, q, hd]
        scratch = max(KV * (S + b) * rb, B * KV * m.step_len * rb)
        self._scratch = {name: self._malloc(scratch) for name in self.present_names}
        self._alloc_io(rows=max(b, B * self._rows["step"], B), ids=max(S, B * b))
        self._cuda.stream_synchronize(self._stream)

    # -- sessions and bindings ----------------------------------------------------------------
    def _providers(self, cuda_graph: bool) -> list:
        if self._ort_device != "cuda":
            return ["CPUExecutionProvider"]
        options = {"device_id": str(self.device), "user_compute_stream": str(self._stream),
                   "enable_cuda_graph": "1" if cuda_graph else "0"}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]

    def _session(self, kind: str, cuda_graph: bool):
        ort, spec = self._ort, self.manifest.graphs.get(kind)
        if spec is None:
            raise TiDARError(f"{self.dir}: the artifact has no {kind} graph")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            sess = ort.InferenceSession(str(self.dir / spec.file), opts, providers=self._providers(cuda_graph))
        except Exception as e:  # ORT raises its own types (a corrupt graph, a refused CUDA graph)
            first = first_line(e)
            if cuda_graph:  # e.g. nodes left on the CPU provider: run this session without a graph
                self.cuda_graph_status[kind] = f"eager: ONNX Runtime refused the CUDA graph ({first})"
                return self._session(kind, False)
            raise TiDARError(f"{self.dir / spec.file}: ONNX Runtime cannot load it ({first})") from None
        if self._ort_device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
            raise TiDARError("ONNX Runtime did not enable its CUDA provider (no usable GPU or CUDA libraries)")
        if cuda_graph:
            self.cuda_graph_status[kind] = "captured by ONNX Runtime"
        return sess

    def _setup_sessions(self) -> None:
        ort = self._ort
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._sessions = {"prefill": self._session("prefill", False)}
        for kind in CACHED_KINDS:
            self._sessions[kind] = self._session(kind, self.cuda_graphs)
        B, KV, S, hd = self._kv_shape
        self._bindings = {}
        for kind in CACHED_KINDS:
            width, rows, new = (self.block_size if kind == "step" else 1), self._rows[kind], self._new_len[kind]
            cache = self._cache[0]  # one set: "slice" and "alias" graphs never swap sets
            io = self._sessions[kind].io_binding()
            self._bind_in(io, ids_input(kind), np.int64, (B, width), self._d_ids)
            self._bind_in(io, CACHE_LEN, np.int64, (B,), self._d_cache_len)
            for name in self.past_names:
                self._bind_in(io, name, self.kv_dtype, self._kv_shape, cache[name])
            self._bind_out(io, TOKEN_IDS, np.int64, (B, rows), self._d_tok)
            self._bind_out(io, LOGITS, np.float32, (B, rows, self.vocab_size), self._d_logits)
            for past, pres in zip(self.past_names, self.present_names):
                if self.kv_modes[kind] == "slice":
                    self._bind_out(io, pres, self.kv_dtype, (B, KV, new, hd), self._scratch[pres])
                else:  # "alias": the whole updated cache is the cache buffer itself
                    self._bind_out(io, pres, self.kv_dtype, self._kv_shape, cache[past])
            self._bindings[kind] = io

    def _bind_in(self, io, name: str, dtype, shape, ptr: int) -> None:
        io.bind_input(name, self._ort_device, self.device, dtype, list(shape), ptr)

    def _bind_out(self, io, name: str, dtype, shape, ptr: int) -> None:
        io.bind_output(name, self._ort_device, self.device, dtype, list(shape), ptr)

    # -- passes -------------------------------------------------------------------------------
    def prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        self._check_open()
        prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
        P, b, (_, KV, S, hd) = prompt.size, self.block_size, self._kv_shape
        if not 1 <= P <= S:
            raise TiDARError(f"a prompt of {P} tokens does not fit the KV cache of {S} slots")
        self._upload_ids(prompt)
        io = self._sessions["prefill"].io_binding()  # the prompt length varies: bound per call, no allocation
        self._bind_in(io, INPUT_IDS, np.int64, (1, P), self._d_ids)
        self._bind_out(io, TOKEN_IDS, np.int64, (1, b), self._d_tok)
        self._bind_out(io, LOGITS, np.float32, (1, b, self.vocab_size), self._d_logits)
        for pres in self.present_names:
            self._bind_out(io, pres, self.kv_dtype, (1, KV, P + b, hd), self._scratch[pres])
        self._sessions["prefill"].run_with_iobinding(io, self._run_options)
        self._commit_prefill_kv(row, P)
        return self._fetch(1, b, want_logits)

    def _run_cached(self, kind: str, ids: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        self._check_open()
        self._upload_step_inputs(ids, cache_len)
        self._sessions[kind].run_with_iobinding(self._bindings[kind], self._run_options)
        self._commit_step_kv(kind, cache_len)  # "slice": each row's new K/V at its L; "alias": nothing
        return self._fetch(self.max_batch, self._rows[kind], want_logits)

    # -- teardown (close: DeviceBackend) ------------------------------------------------------
    def _release(self) -> None:
        """The sessions and their bindings, before the memory they point at."""
        self._bindings, self._sessions = {}, {}
