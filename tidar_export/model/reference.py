"""The torch reference: the backend that runs the reference model under the runtime's decode
loop, and the outputs each exported graph must produce (what `check` and `compare` test against).

It implements `tidar_runtime.loop.Backend` with the same contract as the exported graphs
(docs/EXPORT.md): a preallocated cache [B, KV, max_len, hd] per layer, each pass attends over
[cache | new] and its new keys/values are written at the row's L. So the one loop of
`tidar_runtime.loop` decodes the torch model exactly as it decodes an engine.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import torch

from tidar_export.model import masks
from tidar_export.errors import TiDARError
from tidar_export.model.checkpoint import load_checkpoint
from tidar_export.model.transformer import TiDARModel
from tidar_runtime.contract import (CACHE_LEN, INPUT_IDS, LOGITS, TOKEN_IDS, ids_input, normalize_proposals, past_names,
                                    prefill_out_rows, present_names)
from tidar_runtime.loop import Outputs
from tidar_runtime.manifest import Manifest, load_manifest


class TorchBackend:
    def __init__(self, model: TiDARModel, max_len: int = 512, block_size: int | None = None,
                 proposals: Sequence[int] | None = None, max_batch: int = 1):
        self.model = model.eval()
        self.block_size = block_size or model.cfg.block_size
        self.proposals = normalize_proposals(self.block_size, proposals)
        self.max_len, self.max_batch = max_len, max_batch
        self.mask_token_id, self.vocab_size = model.cfg.mask_token_id, model.cfg.vocab_size
        self.keys, self.values = model.new_cache(max_batch, max_len)
        self._static = {"step": masks.step_pass(self.block_size, self.proposals), "ar_step": masks.ar_pass()}
        self.manifest: Manifest | None = None  # set by from_artifact

    @classmethod
    def from_artifact(cls, artifact_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None
                      ) -> "TorchBackend":
        """The reference model under an artifact's settings (block size, proposals, cache, batch).

        An artifact holds ONNX graphs and a manifest, never torch weights, and its manifest
        records no machine paths: the checkpoint it was exported from is given here
        (`--checkpoint DIR`), and its config must equal the manifest's model config.
        """
        manifest = load_manifest(artifact_dir)
        if checkpoint is None:
            raise TiDARError("backend torch needs the checkpoint the artifact was exported from (the artifact "
                             "holds no torch weights): pass --checkpoint DIR")
        model = reference_model(checkpoint, manifest)
        backend = cls(model, manifest.max_seq_len, manifest.block_size, manifest.proposals, manifest.max_batch)
        backend.manifest = manifest
        return backend

    @torch.no_grad()
    def _run(self, rows: slice, ids, positions, in_step, cache_len, out_rows, want_logits,
             draft_rows: int = 0) -> Outputs:
        """ids/positions [B', T] for cache rows `rows` (the last `draft_rows` are mask rows); writes
        the new K/V at each row's L."""
        keys = [k[rows] for k in self.keys]
        values = [v[rows] for v in self.values]
        logits, new_k, new_v = self.model(ids, positions, in_step, keys, values, cache_len, kv_update="slice",
                                          draft_rows=draft_rows)
        T = ids.shape[1]
        for layer in range(len(self.keys)):
            for j, L in enumerate(cache_len.tolist()):
                n = min(T, self.max_len - L)  # an AR prefill's mask slots may overhang the cache: hidden anyway
                self.keys[layer][rows.start + j, :, L : L + n] = new_k[layer][j, :, :n]
                self.values[layer][rows.start + j, :, L : L + n] = new_v[layer][j, :, :n]
        logits = logits[:, out_rows].float()
        return Outputs(logits.argmax(-1).numpy(), logits.numpy() if want_logits else None)

    def prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        P = len(prompt)
        ids, positions, mask = masks.prefill_pass(torch.as_tensor(prompt)[None], self.block_size, self.mask_token_id)
        return self._run(slice(row, row + 1), ids, positions, mask, torch.zeros(1, dtype=torch.long),
                         torch.tensor(prefill_out_rows(P, self.block_size)), want_logits, self.block_size)

    def _cached(self, kind: str, given: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        in_step, offsets, out_rows = self._static[kind]
        L = torch.as_tensor(cache_len)
        ids = masks.pass_ids(torch.as_tensor(given), len(offsets), self.mask_token_id)
        return self._run(slice(0, len(L)), ids, masks.pass_positions(L, offsets), in_step, L, out_rows, want_logits,
                         len(offsets) - given.shape[1])  # the mask rows after the given ids

    def step(self, drafts: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        return self._cached("step", drafts, cache_len, want_logits)

    def ar_prefill(self, row: int, prompt: np.ndarray, want_logits: bool) -> Outputs:
        P = len(prompt)  # a causal pass over the prompt alone (the exported backends reuse the TiDAR prefill)
        return self._run(slice(row, row + 1), torch.as_tensor(prompt)[None], torch.arange(P)[None],
                         masks.causal_mask(P), torch.zeros(1, dtype=torch.long), torch.tensor([P - 1]), want_logits)

    def ar_step(self, tokens: np.ndarray, cache_len: np.ndarray, want_logits: bool) -> Outputs:
        return self._cached("ar_step", tokens, cache_len, want_logits)


def reference_outputs(model, manifest: Manifest, kind: str, feeds: dict) -> dict[str, np.ndarray]:
    """The outputs the graph must produce, from the reference model's own forward (the inputs built
    as the traced graphs build them: tidar_export.model.masks)."""
    b, n = manifest.block_size, model.cfg.num_layers
    with torch.no_grad():
        if kind == "prefill":
            prompt = feeds[INPUT_IDS]
            ids, positions, mask = masks.prefill_pass(prompt, b, manifest.mask_token_id)
            logits, keys, values = model(ids, positions, mask, draft_rows=b)
            rows = torch.tensor(prefill_out_rows(prompt.shape[1], b))
            present = [(k, v) for k, v in zip(keys, values)]
        else:
            L = feeds[CACHE_LEN]
            past = [feeds[name].clone() for name in past_names(n)]
            in_step, offsets, rows = masks.step_pass(b, manifest.proposals) if kind == "step" else masks.ar_pass()
            given = feeds[ids_input(kind)]
            ids = masks.pass_ids(given, len(offsets), manifest.mask_token_id)
            T = ids.shape[1]
            logits, keys, values = model(ids, masks.pass_positions(L, offsets), in_step, past[0::2], past[1::2], L,
                                         kv_update="inplace", draft_rows=T - given.shape[1])
            if manifest.graphs[kind].kv_update == "slice":  # the new K/V only: slots L..L+T-1 of each row
                pick = lambda c: torch.stack([c[j, :, l : l + T] for j, l in enumerate(L.tolist())])  # noqa: E731
                present = [(pick(k), pick(v)) for k, v in zip(keys, values)]
            else:
                present = list(zip(keys, values))
        wide = logits.dtype == torch.float64  # check's float64 reference keeps its precision
        logits = logits[:, rows] if wide else logits[:, rows].float()
        out = {TOKEN_IDS: logits.argmax(-1).numpy(), LOGITS: logits.numpy()}
        for name, t in zip(present_names(n), (t for kv in present for t in kv)):
            out[name] = (t if wide else t.float()).numpy()
    return out


def reference_model(checkpoint: str | os.PathLike, manifest: Manifest):
    """The torch model of `checkpoint` as the artifact was exported (block size, mask id, dtype)."""
    from tidar_export.export.tracing import torch_dtype

    return load_artifact_model(checkpoint, manifest, torch_dtype(manifest.precision))


def load_artifact_model(checkpoint: str | os.PathLike, manifest: Manifest, dtype):
    """The torch model of `checkpoint` in `dtype` with the artifact's block size and mask id; a
    TiDARError naming the first config field that differs from the manifest's model."""
    model = load_checkpoint(checkpoint, manifest.block_size, manifest.mask_token_id, dtype=dtype)
    have, want = dataclasses.asdict(model.cfg), manifest.model_config()
    differ = [k for k, v in want.items() if have.get(k) != v]
    if differ:
        raise TiDARError(f"checkpoint {checkpoint} is not the model of this artifact: {differ[0]} is "
                         f"{have.get(differ[0])!r}, the manifest says {want[differ[0]]!r}")
    check_adapter(model, manifest, checkpoint)
    return model


def check_adapter(model, manifest: Manifest, checkpoint) -> None:
    """The checkpoint's draft adapter must be the one the artifact's graphs carry (or both none)."""
    from tidar_export.model.adapter import describe

    have = describe(model.adapter)["sha256"] if model.adapter is not None else None
    want = (getattr(manifest, "adapter", None) or {}).get("sha256")
    if have != want:
        raise TiDARError(f"checkpoint {checkpoint} is not the model of this artifact: its draft adapter is "
                         f"{have or 'none'}, the manifest says {want or 'none'}")
