"""The graph contract: every fact a runtime (Python or C++) and the exporter must agree on, in one
place (no torch). docs/ARCHITECTURE.md describes it; runtime/manifest.schema.json states how a
manifest records it.

- Graph kinds: `prefill`, `step`, `ar_step` (GRAPH_KINDS); the cached ones read and write the KV cache.
- Binding names: ids in (`input_ids`, or `draft_ids` for the step), `cache_len` [B] for the cached
  graphs, `past_key_values.{i}.key/value` in; `token_ids`, `logits`, `present.{i}.key/value` out,
  layer i = 0..num_layers-1, key before value (`graph_io` lists them with dtypes and named shapes).
- Cache-update modes (KV_UPDATES), one vocabulary from the model to the manifest: "slice": the graph
  returns only the pass's new K/V [B, KV, T, hd] and the runtime writes them at each row's L;
  "inplace": it returns the whole cache [B, KV, max_seq_len, hd] with the new K/V written at L
  (a runtime binds present.* to the past_key_values.* buffers where the engine aliases them).
- Output rows. Decode step, per batch row, `n_out = b + R * (b - 1)` rows:
      [AR at draft 0 .. AR at draft b-1 | block r_1 slots 1..b-1 | block r_2 slots 1..b-1 | ...]
  AR row i predicts position L+i+1; block r slot t predicts position L+r+t. Slot 0 of a block
  predicts the anchor's position, which always comes from AR, so it is not returned.
  Prefill outputs b rows: [AR at p_{P-1} | mask slots 1..b-1]. The AR step outputs one row.
- Dtype names (DTYPES, numpy-style), precision names (FLOAT_PRECISIONS, QUANTIZED_PRECISIONS) and
  the bounds of every size a runtime allocates from (BOUNDS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tidar_runtime.errors import TiDARError

# --------------------------------------------------------------------------- graphs and bindings

MANIFEST_FILE, MANIFEST_FORMAT = "manifest.json", "tidar-manifest"
MANIFEST_VERSION = 2  # 2: each fact once (dims, export, model, tokenizer), per-graph kv_update and rows
GRAPH_KINDS = ("prefill", "step", "ar_step")  # the graphs of every artifact, in export order
CACHED_KINDS = ("step", "ar_step")  # the graphs that read and write the KV cache
INPUT_IDS, DRAFT_IDS, CACHE_LEN = "input_ids", "draft_ids", "cache_len"
TOKEN_IDS, LOGITS = "token_ids", "logits"
OUTPUTS = (TOKEN_IDS, LOGITS)  # the non-cache outputs of every graph, in binding order
PAST_PREFIX, PRESENT_PREFIX = "past_key_values", "present"
KV_UPDATES = ("slice", "inplace")
AR_STEPS = ("gqa", "attention")  # the AR step's attention: ONNX Runtime's GroupQueryAttention, or the step's op


def ids_input(kind: str) -> str:
    """The token-id input of graph `kind`: the step reads drafts, the others tokens."""
    return DRAFT_IDS if kind == "step" else INPUT_IDS


def runtime_inputs(kind: str) -> tuple[str, ...]:
    """The non-cache inputs a runtime feeds to graph `kind`, in binding order."""
    return (INPUT_IDS,) if kind == "prefill" else (ids_input(kind), CACHE_LEN)


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """KV binding names of every layer, key before value: `{prefix}.{i}.key`, `{prefix}.{i}.value`."""
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def past_names(num_layers: int) -> list[str]:
    return kv_names(num_layers, PAST_PREFIX)


def present_names(num_layers: int) -> list[str]:
    return kv_names(num_layers, PRESENT_PREFIX)


def is_present(name: str) -> bool:
    return name.startswith(PRESENT_PREFIX + ".")


@dataclass
class TensorSpec:
    name: str  # binding name, e.g. "past_key_values.0.key"
    dtype: str  # one of DTYPES
    shape: list[int | str]  # ints are static; strings name a dimension (see DIMS)


def graph_io(kind: str, num_layers: int, kv_dtype: str, kv_update: str | None
             ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Binding names, dtypes and named shapes of graph `kind` (the manifest's I/O of each graph).

    kv_dtype: the cache's dtype name; kv_update: the graph's cache-update mode (None: prefill)."""
    if kind == "prefill":
        inputs = [TensorSpec(INPUT_IDS, "int64", ["prefill_batch", "prompt_len"])]
        rows, batch, present_len = "block_size", "prefill_batch", "prefill_len"
    else:
        inputs = [TensorSpec(ids_input(kind), "int64", ["batch", "block_size" if kind == "step" else 1]),
                  TensorSpec(CACHE_LEN, "int64", ["batch"])]
        inputs += [TensorSpec(name, kv_dtype, ["batch", "kv_heads", "max_seq_len", "head_dim"])
                   for name in past_names(num_layers)]
        rows, batch = ("n_out", "batch") if kind == "step" else (1, "batch")
        new_len = "q_len" if kind == "step" else 1
        present_len = new_len if kv_update == "slice" else "max_seq_len"
    outputs = [TensorSpec(TOKEN_IDS, "int64", [batch, rows]),
               TensorSpec(LOGITS, "float32", [batch, rows, "vocab"])]
    outputs += [TensorSpec(name, kv_dtype, [batch, "kv_heads", present_len, "head_dim"])
                for name in present_names(num_layers)]
    return inputs, outputs


# Named dims of the graphs' shapes: None where the dim is dynamic (set per call).
DIMS = {
    "batch": "rows of the step and ar_step graphs (static: the artifact's max_batch)",
    "prefill_batch": "rows of one prefill call (dynamic)",
    "prompt_len": "prompt tokens of one prefill call (dynamic, 1..max_seq_len - block_size)",
    "prefill_len": "prompt_len + block_size: K/V rows returned by the prefill (dynamic)",
    "block_size": "b: draft rows of the step graph",
    "q_len": "rows of one decode step: b + b * len(proposals)",
    "n_out": "output rows of the step: b + len(proposals) * (b - 1)",
    "max_seq_len": "KV cache slots per row",
    "kv_heads": "key/value heads",
    "head_dim": "width of one head",
    "vocab": "vocabulary size (logits per row)",
    "num_layers": "decoder layers (one past/present key and value binding each)",
}
DYNAMIC_DIMS = ("prefill_batch", "prompt_len", "prefill_len")


# --------------------------------------------------------------------------- dtypes and precisions

# The dtype names a manifest uses (numpy-style), with their ONNX TensorProto code and TensorRT
# DataType name: the one table every tracer, checker and backend translates through.
DTYPES = {
    "float32": (1, "FLOAT"), "float16": (10, "HALF"), "bfloat16": (16, "BF16"), "int64": (7, "INT64"),
    "int32": (6, "INT32"), "int8": (3, "INT8"), "uint8": (2, "UINT8"), "bool": (9, "BOOL"),
    "float8e4m3fn": (17, "FP8"),
}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1,
            "bool": 1, "float8e4m3fn": 1}


def dtype_of_onnx(code: int) -> str:
    """The dtype name of an ONNX TensorProto element type (the code itself, as text, if unnamed)."""
    return next((name for name, (c, _) in DTYPES.items() if c == code), str(code))


def dtype_of_trt(name: str) -> str:
    """The dtype name of a TensorRT DataType name ("FLOAT" -> "float32")."""
    return next((n for n, (_, t) in DTYPES.items() if t == name), name.lower())


# Precisions. An export is in one float precision (its weights, activations and KV cache); a
# quantized artifact (`tidar-export quantize`) keeps the float I/O of its base export.
FLOAT_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # precision -> dtype name
QUANTIZED_PRECISIONS = ("int8", "fp8", "int4", "int8-wo")  # Q/DQ (int8, fp8) and weight-only (int4, int8-wo)
WEIGHT_ONLY_PRECISIONS = ("int4", "int8-wo")
PRECISIONS = (*FLOAT_PRECISIONS, *QUANTIZED_PRECISIONS)  # every precision an artifact may have


def float_precision(dtype: str) -> str | None:
    """The float precision of a dtype name ("float16" -> "fp16"), None for other dtypes."""
    return next((p for p, d in FLOAT_PRECISIONS.items() if d == dtype), None)


# --------------------------------------------------------------------------- bounds

# Bounds of every integer a model config or a manifest gives (the largest supported checkpoints
# sit far inside them); a value outside is refused before anything is allocated from it.
BOUNDS = {
    "vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 17), "intermediate_size": (1, 1 << 20),
    "num_layers": (1, 1024), "num_heads": (1, 1024), "num_kv_heads": (1, 1024), "head_dim": (2, 1024),
    "max_position_embeddings": (1, 1 << 24), "block_size": (1, 1024), "max_seq_len": (2, 1 << 22),
    "max_batch": (1, 4096),
}


# --------------------------------------------------------------------------- output rows

def normalize_proposals(block_size: int, proposals: Sequence[int] | None) -> tuple[int, ...]:
    """The acceptance levels r that get a pre-drafted block, sorted.

    None means all of 1..b (the paper's default). Block 1 must be present: after a step that
    accepts only the anchor (k = 1) it is the only block that can draft the next step, and
    without it decoding would fall back to one token per step for good (the paper leaves this
    open, docs/ALGORITHM.md section 8; this project requires it, see docs/DECISIONS.md).
    """
    b = block_size
    if proposals is None:
        return tuple(range(1, b + 1))
    rs = tuple(sorted(set(int(r) for r in proposals)))
    if not rs or rs[0] < 1 or rs[-1] > b:
        raise TiDARError(f"proposal levels must lie in 1..{b}, got {list(proposals)}")
    if rs[0] != 1:
        raise TiDARError(f"the proposal set must contain block 1 (got {list(rs)}); see docs/DECISIONS.md")
    return rs


def step_len(block_size: int, proposals: Sequence[int] | None = None) -> int:
    """q_len of one decode step: b drafts plus b mask slots per proposal block."""
    return block_size * (1 + len(normalize_proposals(block_size, proposals)))


def n_out(block_size: int, proposals: Sequence[int]) -> int:
    """Output rows of the step graph."""
    return block_size + len(proposals) * (block_size - 1)


def block_out_row(block_size: int, proposals: Sequence[int], r: int) -> int:
    """Output row of slot 1 of proposal block r (slot t is at this row + t - 1)."""
    return block_size + list(proposals).index(r) * (block_size - 1)


def step_out_rows(block_size: int, proposals: Sequence[int]) -> list[int]:
    """For each output row, its row inside the step's q_len input rows."""
    b = block_size
    rows = list(range(b))
    for n in range(len(proposals)):
        rows += [b + n * b + t for t in range(1, b)]
    return rows


def prefill_out_rows(prompt_len: int, block_size: int) -> list[int]:
    """For each prefill output row, its row among the P + b input rows: AR at p_{P-1} (row P-1),
    then mask slots 1..b-1 (rows P+1 .. P+b-1). Slot 0 would predict p_P, which AR decides."""
    P, b = prompt_len, block_size
    return [P - 1, *range(P + 1, P + b)]


def step_rows(block_size: int, proposals: Sequence[int]) -> list[dict]:
    """What each output row of the step graph predicts, as the manifest records it: {"ar": i} for
    AR at draft i (position L+i+1), {"block": r, "slot": t} for slot t of block r (position L+r+t)."""
    rows = [{"ar": i} for i in range(block_size)]
    return rows + [{"block": r, "slot": t} for r in proposals for t in range(1, block_size)]


def graph_rows(kind: str, block_size: int, proposals: Sequence[int]) -> list[dict]:
    """What each output row of graph `kind` predicts (prefill: AR at the last prompt token, then
    mask slots 1..b-1 at P+t, recorded as block 0; ar_step: one AR row)."""
    if kind == "step":
        return step_rows(block_size, proposals)
    if kind == "prefill":
        return [{"ar": 0}] + [{"block": 0, "slot": t} for t in range(1, block_size)]
    return [{"ar": 0}]
