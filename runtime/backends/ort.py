"""ONNX Runtime backend: runs an exported artifact (manifest + prefill/step/ar_step graphs).

The KV cache is a set of preallocated numpy arrays [B, KV, max_len, hd] per layer, bound to
the step graphs as inputs without copies (I/O binding). Each cached graph has a kv_update
(`GraphSpec.kv_update` in the manifest). "slice": the graph returns only the pass's new K/V [B, KV, q, hd];
this backend writes them at each row's L (a copy of q slots per row and layer: the commit
itself is the loop's `L += k`). "inplace": the graph returns the whole updated cache, and its
present.* outputs are bound to the very buffers of its past_key_values.* inputs, so the graph
writes the new slots in place (GroupQueryAttention in the ort target's AR step detects the
shared buffer by address; TensorScatter in the trt-10.15 graphs skips its copy when its output
aliases its input). No cache-sized array is allocated or copied per step.

The AR mode reuses the TiDAR prefill graph: its first output row is the AR prediction at the
last prompt token, and the prompt's K/V do not depend on the mask slots (which are causal-
invisible to prompt tokens); the mask slots' K/V land past L and are hidden, then overwritten.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from tidar_runtime.errors import TiDARError, first_line
from tidar_runtime.contract import (CACHE_LEN, INPUT_IDS, LOGITS, PAST_PREFIX, PRESENT_PREFIX, TOKEN_IDS, ids_input,
                                    n_out)
from tidar_runtime.loop import Outputs
from tidar_runtime.manifest import read_artifact

HOST_DTYPES = ("float32", "float16", "int64", "int32", "bool")  # the contract's dtypes numpy holds natively


def np_dtype(name: str):
    """The numpy dtype of a contract dtype name the host can hold (tidar_runtime.contract.DTYPES)."""
    if name not in HOST_DTYPES:
        raise TiDARError(f"the ONNX Runtime backend cannot hold {name} tensors on the host")
    return np.dtype(name).type


class OrtBackend:
    def __init__(self, artifact_dir: str | os.PathLike, providers: list[str] | None = None,
                 intra_op_threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise TiDARError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
        self._ort = ort
        m = read_artifact(self, artifact_dir)
        self.providers = providers or ["CPUExecutionProvider"]
        self._opts = ort.SessionOptions()
        self._opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            self._opts.intra_op_num_threads = intra_op_threads
        self._sessions: dict = {}

        spec = m.graphs["step"].input(self.past_names[0])
        self.kv_dtype = np_dtype(spec.dtype)
        shape = (m.max_batch, m.num_kv_heads, m.max_seq_len, m.head_dim)
        self.cache = [np.zeros(shape, self.kv_dtype) for _ in self.past_names]
        self._out = {  # preallocated inputs and outputs of the static-shape graphs
            "step": self._alloc_io("step", self.block_size, n_out(self.block_size, self.proposals), m.step_len),
            "ar_step": self._alloc_io("ar_step", 1, 1, 1),
        }
        self._bindings: dict = {}

    def _inplace(self, kind: str) -> bool:
        return self.manifest.graphs[kind].kv_update == "inplace"

    def _alloc_io(self, kind: str, width: int, rows: int, new_len: int) -> dict:
        m = self.manifest
        B, kv, hd = m.max_batch, m.num_kv_heads, m.head_dim
        present = None if self._inplace(kind) else [np.zeros((B, kv, new_len, hd), self.kv_dtype)
                                                    for _ in self.present_names]
        inputs = {ids_input(kind): np.zeros((B, width), np.int64), CACHE_LEN: np.zeros(B, np.int64)}
        return {"inputs": inputs, "feeds": tuple(inputs.values()),
                TOKEN_IDS: np.zeros((B, rows), np.int64),
                LOGITS: np.zeros((B, rows, self.vocab_size), np.float32),
                "present": present}

    def session(self, kind: str):
        if kind not in self._sessions:
            spec = self.manifest.graphs.get(kind)
            if spec is None:
                raise TiDARError(f"{self.dir}: the artifact has no {kind} graph")
            try:
                self._sessions[kind] = self._ort.InferenceSession(
                    str(self.dir / spec.file), self._opts, providers=self.providers)
            except Exception as e:  # ORT raises its own types for corrupt/truncated models
                raise TiDARError(f"{self.dir / spec.file}: ONNX Runtime cannot load it ({first_line(e)})") from None
        return self._sessions[kind]

    # -- passes ------------------------------------------------------------------------------
    def _binding(self, kind: str):
        """The I/O binding of a static-shape graph, built once (the cache buffers never move).

        Every buffer it names is preallocated and never moves: the id/length inputs (the caller's
        arrays are copied in), the cache, the outputs (logits always: the graph computes them
        anyway, and binding them saves ORT an allocation per run). Rebinding all of them on
        every pass cost about a quarter of an AR step on the demo model (docs/GRAPHS.md).
        """
        if kind in self._bindings:
            return self._bindings[kind]
        sess, out = self.session(kind), self._out[kind]
        io = sess.io_binding()
        for name, arr in out["inputs"].items():
            self._bind_in(io, name, arr)
        for name, arr in zip(self.past_names, self.cache):
            self._bind_in(io, name, arr)
        self._bind_out(io, TOKEN_IDS, out[TOKEN_IDS])
        self._bind_out(io, LOGITS, out[LOGITS])
        targets = self.cache if self._inplace(kind) else out["present"]  # inplace: the past buffers themselves
        for name, arr in zip(self.present_names, targets):
            self._bind_out(io, name, arr)
        self._bindings[kind] = io
        return io

    def _run_static(self, kind: str, ids: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        out = self._out[kind]
        ids_in, len_in = out["feeds"]  # the bound id and length buffers: filled in place
        ids_in[...] = ids
        len_in[...] = cache_len
        run = out.get("run")
        if run is None:  # the session's bound run, made once (its binding never changes)
            run = out["run"] = functools.partial(self.session(kind).run_with_iobinding, self._binding(kind))
        run()
        if not self._inplace(kind):  # inplace: the graph wrote its new slots into the cache itself
            new_len = out["present"][0].shape[2]
            if len(cache_len) == 1:
                L = int(cache_len[0])
                for cache, new in zip(self.cache, out["present"]):
                    cache[0, :, L : L + new_len] = new[0]
            else:
                for cache, new in zip(self.cache, out["present"]):
                    for row, L in enumerate(cache_len.tolist()):
                        cache[row, :, L : L + new_len] = new[row]
        return Outputs(out[TOKEN_IDS], out[LOGITS] if want_logits else None)

    @staticmethod
    def _bind_in(io, name: str, arr: np.ndarray) -> None:
        io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    @staticmethod
    def _bind_out(io, name: str, arr: np.ndarray) -> None:
        io.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        sess = self.session("prefill")
        names = [TOKEN_IDS] + ([LOGITS] if want_logits else []) + self.present_names
        res = sess.run(names, {INPUT_IDS: np.asarray(prompt, np.int64)[None]})
        presents = res[len(names) - len(self.present_names):]
        T = presents[0].shape[2]
        for cache, new in zip(self.cache, presents):
            cache[row, :, :T] = new[0, :, : self.max_len]
        return Outputs(res[0], res[1] if want_logits else None)

    def step(self, drafts: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        return self._run_static("step", drafts, cache_len, want_logits)

    def ar_prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        return self.prefill(row, prompt, want_logits).ar_row()

    def ar_step(self, tokens: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        return self._run_static("ar_step", tokens, cache_len, want_logits)


def run_graph(session, feeds: dict, inplace: bool) -> dict:
    """One run of a cached graph outside a backend (check, quantize's calibration, tests): the
    outputs by name. For an "inplace" graph the present.* outputs are bound to copies of the
    past_key_values.* inputs, as a backend binds them (GroupQueryAttention writes only the new
    slots of a shared buffer); the caller's arrays are not modified."""
    if not inplace:
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))
    io, caches = session.io_binding(), {}
    for name, value in feeds.items():
        if not isinstance(value, np.ndarray):  # an OrtValue (bfloat16): bound as it is, not aliased
            io.bind_ortvalue_input(name, value)
            continue
        if name.startswith(PAST_PREFIX + "."):
            value = caches[name] = np.array(value, copy=True, order="C")
        io.bind_cpu_input(name, value)
    names = [o.name for o in session.get_outputs()]
    aliased = {n: caches[PAST_PREFIX + n[len(PRESENT_PREFIX):]] for n in names
               if n.startswith(PRESENT_PREFIX + ".") and PAST_PREFIX + n[len(PRESENT_PREFIX):] in caches}
    for name in names:
        if name in aliased:
            arr = aliased[name]
            io.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        else:
            io.bind_output(name, "cpu")
    session.run_with_iobinding(io)
    # the aliased caches hold the updated cache
    return {**dict(zip(names, io.copy_outputs_to_cpu())), **aliased}
