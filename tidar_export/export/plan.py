"""The export plan: the validated options that fix an artifact's graphs, and the manifest built from them.

`make_plan` checks the options against the model config (one-line TiDARError for each problem)
and resolves them against the target's table (`tidar_graphs.get_target`): the AR step's form and
every graph's cache-update mode are decided here, once. The tracer, the lowering and the manifest
read them from the plan (`ExportPlan.form`, `ExportPlan.manifest`). No torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tidar_export.errors import TiDARError
from tidar_runtime.contract import AR_STEPS, FLOAT_PRECISIONS, GRAPH_KINDS, n_out, normalize_proposals, step_len
from tidar_runtime.manifest import Manifest, new_manifest

DEFAULT_MAX_SEQ_LEN = 2048


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """Everything that fixes the graphs' shapes, validated and resolved against the target."""

    block_size: int
    proposals: tuple[int, ...]
    target: str
    precision: str  # one of contract.FLOAT_PRECISIONS
    max_seq_len: int
    max_batch: int
    mask_token_id: int
    ar_step: str = "attention"  # "gqa" only where the target has that form and the heads fit it

    def form(self, kind: str):
        """How graph `kind` is lowered (tidar_graphs' GraphForm: cache-update mode, own passes)."""
        import tidar_graphs

        return tidar_graphs.get_target(self.target).form(kind, self.ar_step)

    def kv_update_of(self, kind: str) -> str | None:
        """How graph `kind` writes the cache (contract.KV_UPDATES); None for the prefill."""
        return self.form(kind).kv_update

    @property
    def q_len(self) -> int:
        return step_len(self.block_size, self.proposals)

    @property
    def n_out(self) -> int:
        return n_out(self.block_size, self.proposals)

    @property
    def kv_dtype(self) -> str:
        """The dtype name of the weights, activations and KV cache."""
        return FLOAT_PRECISIONS[self.precision]

    def manifest(self, config: dict, graph_files: dict[str, str] | None = None) -> Manifest:
        """The artifact's manifest for a model config (a dict of TiDARConfig fields): every section
        from this plan and the contract (tokenizer file, versions and weights to be filled in)."""
        return new_manifest(config, target=self.target, precision=self.precision, block_size=self.block_size,
                            proposals=self.proposals, max_seq_len=self.max_seq_len, max_batch=self.max_batch,
                            ar_step=self.ar_step, kv_dtype=self.kv_dtype,
                            graph_files=graph_files or {kind: f"{kind}.onnx" for kind in GRAPH_KINDS},
                            kv_updates={kind: self.kv_update_of(kind) for kind in GRAPH_KINDS},
                            mask_token_id=self.mask_token_id)


def make_plan(cfg, block_size: int | None = None, proposals: Sequence[int] | None = None, target: str = "ort",
              precision: str = "fp32", max_seq_len: int | None = None, max_batch: int = 1,
              ar_step: str = "gqa") -> ExportPlan:
    """Validate the export options against the model config (one-line TiDARError for each problem).

    ar_step: "gqa" (the ort target's AR step as ONNX Runtime's GroupQueryAttention where the head
    size allows; other targets have no such form and ignore it) or "attention" (the same Attention
    op as the step graph: what an artifact to be quantized to int8/fp8 needs, docs/QUANTIZATION.md).
    The plan records what was resolved: "gqa" only where that form is used."""
    import tidar_graphs

    spec = tidar_graphs.get_target(target)  # one-line error for an unknown target
    if precision not in FLOAT_PRECISIONS:
        raise TiDARError(f"unknown dtype {precision!r}: choose one of {', '.join(FLOAT_PRECISIONS)}")
    b = block_size or cfg.block_size
    if b < 1:
        raise TiDARError(f"block size must be >= 1, got {b}")
    rs = normalize_proposals(b, proposals)
    if max_seq_len is None:
        max_seq_len = min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings)
    q = step_len(b, rs)
    if max_seq_len < q + 1:
        raise TiDARError(f"max_seq_len {max_seq_len} is too small: a decode step alone needs {q} slots "
                         f"after at least one prompt token")
    if max_seq_len > cfg.max_position_embeddings:
        raise TiDARError(f"max_seq_len {max_seq_len} exceeds the checkpoint's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    if max_batch < 1:
        raise TiDARError(f"max_batch must be >= 1, got {max_batch}")
    if ar_step not in AR_STEPS:
        raise TiDARError(f"unknown --ar-step {ar_step!r}: choose one of {', '.join(AR_STEPS)}")
    if ar_step == "gqa" and not spec.ar_step_fits(cfg.head_dim):
        ar_step = "attention"
    return ExportPlan(b, rs, target, precision, max_seq_len, max_batch, cfg.mask_token_id, ar_step)
