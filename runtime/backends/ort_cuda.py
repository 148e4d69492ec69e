"""ONNX Runtime on a GPU (CUDA execution provider) with a device-resident KV cache.

Same contract as OrtBackend (tidar_runtime.backends.ort) and the same buffer plan as
TrtBackend (docs/RUNTIME.md):

- Every device buffer is allocated once in `__init__` through the ctypes CUDA helper
  (tidar_runtime.backends.cuda): the KV cache [B, KV, max_len, hd] per layer and K/V (two sets
  for "inplace" artifacts), scratch for the new K/V, the inputs, the token ids and logits; the
  host side is pinned memory. Buffers are bound to ONNX Runtime by address (I/O binding), and
  the bindings of the static step graphs are made once, so a pass never allocates.
- ONNX Runtime runs on this backend's own CUDA stream (`user_compute_stream`) and is told not
  to synchronize at the end of a run (`disable_synchronize_execution_providers`). A pass
  enqueues the input copies, the run, the K/V writes ("slice": one strided copy per row,
  layer and K/V, at the row's L) and the copy of the token ids (and of the logits only when
  sampling) on that one stream, then synchronizes once.
- CUDA graphs: ONNX Runtime's own capture (`enable_cuda_graph`) for the step and ar_step
  sessions, whose bindings never move. Only for "slice" artifacts: "inplace" ones alternate
  two cache sets, and a captured graph would keep the first set's addresses. If ONNX Runtime
  refuses (a node not placed on the CUDA provider), the session runs without a graph and
  `cuda_graph_status` says why.

Written against ONNX Runtime's documented Python API (IOBinding.bind_input/bind_output with
raw addresses, CUDA provider options, run config entries); it runs only where
onnxruntime-gpu and a GPU exist. Its buffer logic is tested on CPU with `ort_device="cpu"`
and a stand-in CUDA API whose "device" memory is host memory (tests/test_runtime.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from tidar_runtime.backends.cuda import (
    MEMCPY_DEVICE_TO_DEVICE,
    MEMCPY_DEVICE_TO_HOST,
    MEMCPY_HOST_TO_DEVICE,
    CudaError,
    pinned_array,
)
from tidar_runtime.backends.ort import _np_dtype
from tidar_runtime.errors import TiDARError
from tidar_runtime.layout import n_out
from tidar_runtime.loop import Outputs
from tidar_runtime.manifest import Manifest, load_manifest

_I64, _F32 = 8, 4  # bytes of an int64 (ids, lengths) and a float32 (logits)


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


class OrtCudaBackend:
    """The decode loop's Backend over ONNX Runtime's CUDA provider (attributes as OrtBackend).

    ort_device / cuda_api: tests only. ort_device="cpu" binds the same buffers as host memory
    to the CPU provider, with cuda_api a stand-in whose "device" allocations are host memory.
    Output arrays are views of pinned buffers, valid until the next call.
    """

    def __init__(self, artifact_dir: str | os.PathLike, *, device: int = 0, cuda_graphs: bool = True,
                 ort_device: str = "cuda", cuda_api=None):
        self._closed = True
        self._ort_device = ort_device
        if ort_device == "cuda":
            ort = import_ort_cuda()
        else:
            import onnxruntime as ort
        if cuda_api is None:
            from tidar_runtime.backends import cuda as cuda_module

            cuda_api = cuda_module.load()  # one-line CudaError without a driver or GPU
        self._ort, self._cuda, self.device = ort, cuda_api, device
        self.dir = Path(artifact_dir)
        self.manifest: Manifest = load_manifest(self.dir)
        m = self.manifest
        if m.kv_update not in ("slice", "inplace"):
            raise TiDARError(f"unknown kv_update {m.kv_update!r} in the manifest")
        self.block_size, self.proposals = m.block_size, tuple(m.proposals)
        self.max_len, self.max_batch, self.mask_token_id = m.max_seq_len, m.max_batch, m.mask_token_id
        self.vocab_size = m.model["vocab_size"]
        layers = m.model["num_layers"]
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        self.kv_dtype = _np_dtype(m.graphs["step"].input(self.past_names[0]).dtype)
        self.kv_mode = "slice" if m.kv_update == "slice" else "pingpong"
        self.cuda_graphs = cuda_graphs and self.kv_mode == "slice" and ort_device == "cuda"
        self.cuda_graph_status: dict[str, str] = {}
        cuda_api.set_device(device)
        try:
            self._setup_buffers()
            self._setup_sessions()
        except BaseException:
            self.close()
            raise

    # -- buffers ------------------------------------------------------------------------------
    def _malloc(self, nbytes: int) -> int:
        ptr = self._cuda.malloc(nbytes)
        self._device_allocs.append(ptr)
        return ptr

    def _pinned(self, count: int, dtype) -> tuple[int, np.ndarray]:
        ptr = self._cuda.host_alloc(count * np.dtype(dtype).itemsize)
        self._host_allocs.append(ptr)
        return ptr, pinned_array(ptr, (count,), dtype)

    def _setup_buffers(self) -> None:
        m, cu = self.manifest, self._cuda
        self._device_allocs, self._host_allocs, self._closed = [], [], False
        self._stream = cu.stream_create()
        B, b, S = self.max_batch, self.block_size, self.max_len
        KV, hd = m.model["num_kv_heads"], m.model["head_dim"]
        self._kv_shape = (B, KV, S, hd)
        self._rb = hd * np.dtype(self.kv_dtype).itemsize  # bytes of one slot of one head
        self._rows = {"prefill": b, "step": n_out(b, self.proposals), "ar_step": 1}
        self._new_len = {"step": m.step_len, "ar_step": 1}
        sets = 2 if self.kv_mode == "pingpong" else 1
        cache_bytes = B * KV * S * self._rb
        self._cache = [{name: self._malloc(cache_bytes) for name in self.past_names} for _ in range(sets)]
        for cache in self._cache:
            for ptr in cache.values():
                cu.memset_async(ptr, 0, cache_bytes, self._stream)
        self._parity = 0  # which set holds the committed K/V ("pingpong")
        # new K/V: the prefill's [1, KV, P + b, hd] (P <= S), and in "slice" mode the steps' [B, KV, q, hd]
        scratch = max(KV * (S + b) * self._rb, B * KV * m.step_len * self._rb)
        self._scratch = {name: self._malloc(scratch) for name in self.present_names}
        rows = max(b, B * self._rows["step"], B)
        self._d_tok, self._d_logits = self._malloc(rows * _I64), self._malloc(rows * self.vocab_size * _F32)
        self._h_tok_ptr, self._h_tok = self._pinned(rows, np.int64)
        self._h_logits_ptr, self._h_logits = self._pinned(rows * self.vocab_size, np.float32)
        ids = max(S, B * b)
        self._d_ids, self._d_cache_len = self._malloc(ids * _I64), self._malloc(B * _I64)
        self._h_ids_ptr, self._h_ids = self._pinned(ids, np.int64)
        self._h_cache_len_ptr, self._h_cache_len = self._pinned(B, np.int64)
        cu.stream_synchronize(self._stream)

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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
        for kind in ("step", "ar_step"):
            self._sessions[kind] = self._session(kind, self.cuda_graphs)
        B, KV, S, hd = self._kv_shape
        self._bindings = {}
        for kind in ("step", "ar_step"):
            width, rows, new = (self.block_size if kind == "step" else 1), self._rows[kind], self._new_len[kind]
            for parity in range(len(self._cache)):
                io = self._sessions[kind].io_binding()
                self._bind_in(io, "draft_ids" if kind == "step" else "input_ids", np.int64, (B, width), self._d_ids)
                self._bind_in(io, "cache_len", np.int64, (B,), self._d_cache_len)
                for name in self.past_names:
                    self._bind_in(io, name, self.kv_dtype, self._kv_shape, self._cache[parity][name])
                self._bind_out(io, "token_ids", np.int64, (B, rows), self._d_tok)
                self._bind_out(io, "logits", np.float32, (B, rows, self.vocab_size), self._d_logits)
                for past, pres in zip(self.past_names, self.present_names):
                    if self.kv_mode == "slice":
                        self._bind_out(io, pres, self.kv_dtype, (B, KV, new, hd), self._scratch[pres])
                    else:  # the whole updated cache, into the other set
                        self._bind_out(io, pres, self.kv_dtype, self._kv_shape, self._cache[1 - parity][past])
                self._bindings[(kind, parity)] = io

    def _bind_in(self, io, name: str, dtype, shape, ptr: int) -> None:
        io.bind_input(name, self._ort_device, self.device, dtype, list(shape), ptr)

    def _bind_out(self, io, name: str, dtype, shape, ptr: int) -> None:
        io.bind_output(name, self._ort_device, self.device, dtype, list(shape), ptr)

    # -- passes -------------------------------------------------------------------------------
    def _copy_kv(self, row: int, slot: int, count: int, src_row: int, src_len: int) -> None:
        """For every layer and K/V: `count` slots of row `src_row` of the [*, KV, src_len, hd]
        scratch to slots slot.. of cache row `row`, one strided copy of KV rows each."""
        KV, S, rb = self._kv_shape[1], self.max_len, self._rb
        dst_set = self._cache[self._parity]
        for past, pres in zip(self.past_names, self.present_names):
            self._cuda.memcpy2d_async(dst_set[past] + (row * KV * S + slot) * rb, S * rb,
                                      self._scratch[pres] + src_row * KV * src_len * rb, src_len * rb,
                                      count * rb, KV, MEMCPY_DEVICE_TO_DEVICE, self._stream)

    def _fetch(self, batch: int, rows: int, want_logits: bool) -> Outputs:
        """Copy the outputs to pinned host memory and wait: the one host synchronization of a pass."""
        cu, s, n = self._cuda, self._stream, batch * rows
        cu.memcpy_async(self._h_tok_ptr, self._d_tok, n * _I64, MEMCPY_DEVICE_TO_HOST, s)
        if want_logits:
            cu.memcpy_async(self._h_logits_ptr, self._d_logits, n * self.vocab_size * _F32, MEMCPY_DEVICE_TO_HOST, s)
        cu.stream_synchronize(s)
        logits = self._h_logits[: n * self.vocab_size].reshape(batch, rows, self.vocab_size) if want_logits else None
        return Outputs(self._h_tok[:n].reshape(batch, rows), logits)

    def _check_open(self) -> None:
        if self._closed:
            raise TiDARError("this ONNX Runtime CUDA backend was closed")

    def prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        self._check_open()
        prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
        P, b, (B, KV, S, hd) = prompt.size, self.block_size, self._kv_shape
        if not 1 <= P <= S:
            raise TiDARError(f"a prompt of {P} tokens does not fit the KV cache of {S} slots")
        self._h_ids[:P] = prompt
        self._cuda.memcpy_async(self._d_ids, self._h_ids_ptr, P * _I64, MEMCPY_HOST_TO_DEVICE, self._stream)
        io = self._sessions["prefill"].io_binding()  # the prompt length varies: bound per call, no allocation
        self._bind_in(io, "input_ids", np.int64, (1, P), self._d_ids)
        self._bind_out(io, "token_ids", np.int64, (1, b), self._d_tok)
        self._bind_out(io, "logits", np.float32, (1, b, self.vocab_size), self._d_logits)
        for pres in self.present_names:
            self._bind_out(io, pres, self.kv_dtype, (1, KV, P + b, hd), self._scratch[pres])
        self._sessions["prefill"].run_with_iobinding(io, self._run_options)
        # prompt and mask slots; the mask slots' K/V land past L, hidden (an AR prompt may overhang)
        self._copy_kv(row, 0, min(P + b, S), 0, P + b)
        return self._fetch(1, b, want_logits)

    def ar_prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        out = self.prefill(row, prompt, want_logits)
        return Outputs(out.token_ids[:, :1], None if out.logits is None else out.logits[:, :1])

    def _run_cached(self, kind: str, ids: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        self._check_open()
        B, s = self.max_batch, self._stream
        self._h_ids[: ids.size] = ids.reshape(-1)
        self._h_cache_len[:] = cache_len
        self._cuda.memcpy_async(self._d_ids, self._h_ids_ptr, ids.size * _I64, MEMCPY_HOST_TO_DEVICE, s)
        self._cuda.memcpy_async(self._d_cache_len, self._h_cache_len_ptr, B * _I64, MEMCPY_HOST_TO_DEVICE, s)
        self._sessions[kind].run_with_iobinding(self._bindings[(kind, self._parity)], self._run_options)
        if self.kv_mode == "slice":  # each row's new K/V at its L (the commit is the loop's L += k)
            new = self._new_len[kind]
            for row, L in enumerate(cache_len.tolist()):
                count = min(new, self.max_len - L)
                if count > 0:
                    self._copy_kv(row, L, count, row, new)
        else:  # the pass wrote the whole updated cache into the other set
            self._parity ^= 1
        return self._fetch(B, self._rows[kind], want_logits)

    def step(self, drafts: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        return self._run_cached("step", drafts, cache_len, want_logits)

    def ar_step(self, tokens: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        return self._run_cached("ar_step", tokens, cache_len, want_logits)

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the sessions and every buffer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        cu = self._cuda
        if getattr(self, "_stream", None) is not None:
            cu.stream_synchronize(self._stream)
        self._bindings, self._sessions = {}, {}  # before the memory they point at
        for ptr in self._device_allocs:
            cu.free(ptr)
        for ptr in self._host_allocs:
            cu.free_host(ptr)
        self._device_allocs, self._host_allocs = [], []
        if getattr(self, "_stream", None) is not None:
            cu.stream_destroy(self._stream)
            self._stream = None

    def __enter__(self) -> "OrtCudaBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(CudaError):
            self.close()
