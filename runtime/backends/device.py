"""What the two GPU backends share: buffers allocated once, one CUDA stream, one sync per pass.

`DeviceBackend` is the base of TrtBackend (tidar_runtime.backends.trt) and OrtCudaBackend
(tidar_runtime.backends.ort_cuda). It holds the part of their buffer plan (docs/RUNTIME.md)
that does not depend on what runs the graphs:

- allocation: device memory (`_malloc`) and page-locked host memory (`_pinned`), recorded so
  that `close` frees all of it; the KV cache sets (`_alloc_cache`) and the token-id, logits
  and input buffers with their pinned host staging (`_alloc_io`).
- a pass: inputs copied host -> device on the backend's stream (`_upload_ids`,
  `_upload_step_inputs`), the backend runs its graph, the new K/V are committed
  (`_commit_prefill_kv`, `_commit_step_kv`: one strided copy per row, layer and K/V in "slice"
  mode, a swap of the cache sets in "pingpong" mode), and the outputs come back with the one
  host synchronization of the pass (`_fetch`).
- teardown: `close` (idempotent) releases what the backend built over the buffers
  (`_release`), then the buffers and the stream; context manager and `__del__` call it.

numpy only: the CUDA library is loaded by the backends' constructors (or replaced by a
stand-in in tests), never when this module is imported.
"""

from __future__ import annotations

import contextlib
import os
from typing import TypeVar

import numpy as np

from tidar_runtime.backends.cuda import (
    MEMCPY_DEVICE_TO_DEVICE,
    MEMCPY_DEVICE_TO_HOST,
    MEMCPY_HOST_TO_DEVICE,
    CudaError,
    pinned_array,
)
from tidar_runtime.errors import TiDARError
from tidar_runtime.contract import n_out
from tidar_runtime.loop import Outputs
from tidar_runtime.manifest import Manifest, read_artifact

_I64 = 8  # bytes of an int64 (token ids, cache lengths)
_F32 = 4  # bytes of a float32 (logits)

_Self = TypeVar("_Self", bound="DeviceBackend")


def load_cuda(cuda_api=None):
    """`cuda_api` when given (a test stand-in), else the process-wide ctypes CUDA runtime wrapper
    (a one-line CudaError without a driver or GPU)."""
    if cuda_api is not None:
        return cuda_api
    from tidar_runtime.backends import cuda as cuda_module

    return cuda_module.load()


class DeviceBackend:
    """Buffers, K/V commits, output fetch and teardown of a backend on one CUDA stream.

    A subclass sets `_closed = True` first thing in its constructor, `_cuda` (see `load_cuda`),
    calls `_read_manifest`, `_start_buffers`, `_alloc_cache` and `_alloc_io`, fills `_scratch`
    (present.* name -> device buffer of the new K/V), and implements `prefill`, `_run_cached`
    (one step or ar_step pass) and `_release`.
    """

    _what = "backend"  # named by the error after close, e.g. "TensorRT backend"

    # -- construction -------------------------------------------------------------------------
    manifest: Manifest

    def _read_manifest(self, artifact_dir: str | os.PathLike) -> Manifest:
        """Load the artifact's manifest and set the decode loop's attributes from it (as OrtBackend),
        `_rows` (output rows per graph kind) and `_new_len` (K/V slots a step or ar_step pass adds)."""
        m = read_artifact(self, artifact_dir)
        b = self.block_size
        self._rows = {"prefill": b, "step": n_out(b, self.proposals), "ar_step": 1}
        self._new_len = {"step": m.step_len, "ar_step": 1}
        return m

    def _start_buffers(self) -> None:
        """Start recording allocations (from here on `close` has something to release) and
        create the stream every pass is enqueued on."""
        self._device_allocs, self._host_allocs = [], []
        self._stream = None
        self._closed = False
        self._stream = self._cuda.stream_create()

    def _malloc(self, nbytes: int) -> int:
        ptr = self._cuda.malloc(nbytes)
        self._device_allocs.append(ptr)
        return ptr

    def _pinned(self, count: int, dtype) -> tuple[int, np.ndarray]:
        ptr = self._cuda.host_alloc(count * np.dtype(dtype).itemsize)
        self._host_allocs.append(ptr)
        return ptr, pinned_array(ptr, (count,), dtype)

    def _alloc_cache(self, sets: int, kv_heads: int, row_bytes: int) -> None:
        """`sets` zeroed KV caches, each one [B, KV, max_len, hd] buffer per layer and K/V;
        row_bytes: bytes of one slot of one head (hd elements)."""
        self._kv_heads, self._kv_row_bytes = kv_heads, row_bytes
        nbytes = self.max_batch * kv_heads * self.max_len * row_bytes
        self._cache = [{name: self._malloc(nbytes) for name in self.past_names} for _ in range(sets)]
        for cache in self._cache:
            for ptr in cache.values():
                self._cuda.memset_async(ptr, 0, nbytes, self._stream)
        self._parity = 0  # which cache set holds the committed K/V ("pingpong" only)

    def _alloc_io(self, rows: int, ids: int) -> None:
        """Device buffers and their pinned host copies: token ids and logits of up to `rows`
        output rows, up to `ids` input ids, and the B cache lengths."""
        self._d_tok, self._d_logits = self._malloc(rows * _I64), self._malloc(rows * self.vocab_size * _F32)
        self._h_tok_ptr, self._h_tok = self._pinned(rows, np.int64)
        self._h_logits_ptr, self._h_logits = self._pinned(rows * self.vocab_size, np.float32)
        self._d_ids, self._d_cache_len = self._malloc(ids * _I64), self._malloc(self.max_batch * _I64)
        self._h_ids_ptr, self._h_ids = self._pinned(ids, np.int64)
        self._h_cache_len_ptr, self._h_cache_len = self._pinned(self.max_batch, np.int64)

    # -- passes -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TiDARError(f"this {self._what} was closed")

    def _upload_ids(self, ids: np.ndarray) -> None:
        """Stage `ids` (int64) in pinned memory and enqueue their copy to the device."""
        self._h_ids[: ids.size] = ids.reshape(-1)
        self._cuda.memcpy_async(self._d_ids, self._h_ids_ptr, ids.size * _I64, MEMCPY_HOST_TO_DEVICE, self._stream)

    def _upload_step_inputs(self, ids: np.ndarray, cache_len: np.ndarray) -> None:
        """The ids [B, width] and cache lengths [B] of a step or ar_step pass, to the device."""
        self._upload_ids(ids)
        self._h_cache_len[:] = cache_len
        self._cuda.memcpy_async(self._d_cache_len, self._h_cache_len_ptr, self.max_batch * _I64,
                                MEMCPY_HOST_TO_DEVICE, self._stream)

    def _copy_kv(self, row: int, slot: int, count: int, src_row: int, src_len: int) -> None:
        """For every layer and K/V: `count` slots of row `src_row` of the [*, KV, src_len, hd]
        scratch to slots slot.. of row `row` of the committed cache set, one strided copy of KV
        rows each."""
        KV, S, rb = self._kv_heads, self.max_len, self._kv_row_bytes
        dst_set = self._cache[self._parity]
        for past, pres in zip(self.past_names, self.present_names):
            self._cuda.memcpy2d_async(dst_set[past] + (row * KV * S + slot) * rb, S * rb,
                                      self._scratch[pres] + src_row * KV * src_len * rb, src_len * rb,
                                      count * rb, KV, MEMCPY_DEVICE_TO_DEVICE, self._stream)

    def _commit_prefill_kv(self, row: int, prompt_len: int) -> None:
        """The prefill's K/V [1, KV, P + b, hd] into cache row `row`: prompt and mask slots; the
        mask slots' K/V land past L, hidden (an AR prompt may overhang the cache's end)."""
        T = prompt_len + self.block_size
        self._copy_kv(row, 0, min(T, self.max_len), 0, T)

    def _commit_step_kv(self, kind: str, cache_len: np.ndarray) -> None:
        """After a step or ar_step pass. "slice": write each row's new K/V at its L (the commit
        itself is the loop's L += k). "pingpong": the pass wrote the whole updated cache into the
        other set, which now holds the committed K/V. Otherwise ("alias") it was written in place."""
        mode = self.kv_modes[kind]
        if mode == "slice":
            new = self._new_len[kind]
            for row, L in enumerate(cache_len.tolist()):
                count = min(new, self.max_len - L)
                if count > 0:
                    self._copy_kv(row, L, count, row, new)
        elif mode == "pingpong":
            self._parity ^= 1

    def _fetch(self, batch: int, rows: int, want_logits: bool) -> Outputs:
        """Copy the outputs to pinned host memory and wait: the one host synchronization of a pass."""
        cu, s, n = self._cuda, self._stream, batch * rows
        cu.memcpy_async(self._h_tok_ptr, self._d_tok, n * _I64, MEMCPY_DEVICE_TO_HOST, s)
        if want_logits:
            cu.memcpy_async(self._h_logits_ptr, self._d_logits, n * self.vocab_size * _F32, MEMCPY_DEVICE_TO_HOST, s)
        cu.stream_synchronize(s)
        logits = self._h_logits[: n * self.vocab_size].reshape(batch, rows, self.vocab_size) if want_logits else None
        return Outputs(self._h_tok[:n].reshape(batch, rows), logits)

    # -- the decode loop's Backend methods ----------------------------------------------------
    def prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        raise NotImplementedError

    def _run_cached(self, kind: str, ids: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        """One pass of the static-shape `kind` graph ("step" or "ar_step") over all B rows."""
        raise NotImplementedError

    def ar_prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        """The TiDAR prefill; its first output row is the AR prediction at the last prompt token."""
        return self.prefill(row, prompt, want_logits).ar_row()

    def step(self, drafts: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        return self._run_cached("step", drafts, cache_len, want_logits)

    def ar_step(self, tokens: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        return self._run_cached("ar_step", tokens, cache_len, want_logits)

    # -- teardown -----------------------------------------------------------------------------
    def _release(self) -> None:
        """Drop what points at the buffers (sessions, contexts, graphs); called by `close`
        after the stream is drained and before the buffers are freed."""

    def close(self) -> None:
        """Release what the backend built over its buffers, then every buffer and the stream
        (idempotent)."""
        if self._closed:
            return
        self._closed = True
        cu = self._cuda
        if getattr(self, "_stream", None) is not None:
            cu.stream_synchronize(self._stream)
        self._release()
        for ptr in self._device_allocs:
            cu.free(ptr)
        for ptr in self._host_allocs:
            cu.free_host(ptr)
        self._device_allocs, self._host_allocs = [], []
        if getattr(self, "_stream", None) is not None:
            cu.stream_destroy(self._stream)
            self._stream = None

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(CudaError):  # at interpreter exit the driver may already be shutting down
            self.close()
