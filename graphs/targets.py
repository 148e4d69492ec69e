"""Lowering targets: which passes run, at which opset, against which operator table.

`lower(model, target, kind)` is numerically equivalent to its input (tests/test_graphs.py checks
every target in ONNX Runtime). The pipeline is always:

    cleanup -> weight passes -> decompositions -> opset conversion -> fusions -> cleanup -> fix-ups -> tidy

Weight passes rewrite constant weights (the ort target's fused q/k/v projection).
The exporter runs them once more, earlier: on each traced graph before its weights are written
(`prepare_weights`), so that a weight they replace is never stored; `lower` then finds nothing
left to do and reports the counts `prepare_weights` recorded.

Decompositions run before the opset conversion because the fused opset-23/24 ops cannot be
down-converted; fix-ups run after the last `cleanup` because its default rewrite rules would
undo some of them (Min/Max -> Clip). What fired is written to the lowered model's metadata
(`tidar_graphs.target`, `tidar_graphs.passes`, a JSON object of pass -> count).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from tidar_graphs import cleanup, contrib, decompositions, fixups, fusions
from tidar_runtime.errors import TiDARError

logger = logging.getLogger(__name__)

Pass = Callable[[ir.Model], int]


@dataclass(frozen=True)
class GraphForm:
    """How one graph kind is lowered: its cache-update mode and the passes that run on it alone."""

    kv_update: str | None  # tidar_runtime.contract.KV_UPDATES; None: the prefill (no cache input)
    passes: tuple[Pass, ...] = ()  # after the target's fusions, on this graph only


@dataclass(frozen=True)
class Target:
    name: str  # "ort" | "trt-10.3" | "trt-10.15"
    opset: int  # default-domain opset of the lowered graphs
    table: str  # operator table in graphs/optables/, read by the checker
    static_shapes: bool  # graph inputs/outputs must be static, except dims the caller allows
    # How the cached graphs update the KV cache (tidar_runtime.contract.KV_UPDATES, docs/EXPORT.md).
    # "slice": they return only the new K/V [B, KV, T, hd] and the runtime writes them at each row's
    # L. "inplace": they return the whole cache with the new K/V scattered in at L, meant to alias
    # the past buffers.
    kv_update: str
    # int4 weight blocks the target's weight-only operators take (tidar-export quantize)
    int4_block_sizes: tuple[int, ...] = (32, 64, 128)
    # The AR step's form when an export asks for GroupQueryAttention (ar_step="gqa"); None: the
    # target has none, and its AR step is lowered like the step.
    ar_step_gqa: GraphForm | None = None
    weights: tuple[Pass, ...] = ()  # rewrites of constant weights: prepare_weights, then first in lower
    decompose: tuple[Pass, ...] = ()  # before the opset conversion
    fuse: tuple[Pass, ...] = ()  # after the opset conversion, on every graph
    fixups: tuple[Pass, ...] = ()  # after the final cleanup

    def ar_step_fits(self, head_dim: int) -> bool:
        """Whether this target's GroupQueryAttention AR step takes heads of `head_dim`."""
        return self.ar_step_gqa is not None and contrib.group_query_attention_fits(head_dim)

    def form(self, kind: str, ar_step: str = "attention") -> GraphForm:
        """How graph `kind` is lowered: its cache-update mode and its own passes. ar_step: "gqa"
        (this target's GroupQueryAttention AR step; see ar_step_fits) or "attention"."""
        if kind == "prefill":
            return GraphForm(None)
        if kind == "ar_step" and ar_step == "gqa":
            if self.ar_step_gqa is None:
                raise TiDARError(f"target {self.name} has no GroupQueryAttention AR step")
            return self.ar_step_gqa
        return GraphForm(self.kv_update)


_DECOMPOSE_ALL = (decompositions.decompose_attention, decompositions.decompose_rms_norm, decompositions.decompose_rotary,
                  decompositions.decompose_tensor_scatter)

_TARGETS = {
    # ONNX Runtime: opset-23 Attention / RMSNormalization / RotaryEmbedding, which measured
    # faster than the decomposed graph on ORT 1.32 CPU (docs/GRAPHS.md). The prefill and step
    # graphs return the new K/V ("slice"); the AR step is ONNX Runtime's GroupQueryAttention over
    # a cache buffer shared with its outputs ("inplace", graphs/contrib.py): the tracer writes its
    # cache in the graph (ScatterElements), and `ar_step_group_query_attention` folds that write
    # and the attention into one node (models whose head size GroupQueryAttention refuses keep
    # the "slice" AR step). Opset 23 stays: the CUDA provider registers some opset-24 kernels
    # (Reshape, Cast) only in newer builds. q/k/v is one MatMul (a fused weight, in all three graphs
    # so that each weight is stored once; docs/GRAPHS.md has the timings), and the AR step's
    # GroupQueryAttention reads its packed output where there is no qk-norm.
    "ort": Target(
        name="ort", opset=23, table="ort.json", static_shapes=False, kv_update="slice",
        ar_step_gqa=GraphForm("inplace", passes=(contrib.ar_step_group_query_attention,)),
        weights=(fusions.fuse_projections,),
        decompose=(decompositions.decompose_tensor_scatter,),
        fuse=(fusions.fuse_rms_norm, fusions.fuse_rotary, fusions.fuse_attention, fusions.fuse_attention_gqa,
              contrib.attend_used_cache),
    ),
    # TensorRT 10.3 (JetPack 6): no Attention / RMSNormalization / RotaryEmbedding /
    # TensorScatter in its ONNX parser, so everything stays decomposed, at opset 18.
    "trt-10.3": Target(
        name="trt-10.3", opset=18, table="trt-10.3.json", static_shapes=True, kv_update="slice",
        int4_block_sizes=(64, 128),  # TensorRT's (its parser reads opsets up to 20, and block-quantized INT4 needs 21)
        decompose=_DECOMPOSE_ALL,
        fixups=(fixups.int_clip_to_min_max,),
    ),
    # TensorRT 10.15: opset-23 fused ops and the opset-24 in-place cache write.
    "trt-10.15": Target(
        name="trt-10.15", opset=24, table="trt-10.15.json", static_shapes=True, kv_update="inplace",
        int4_block_sizes=(64, 128),  # TensorRT's INT4 weights take per-block scales in blocks of 64 or 128
        fuse=(fusions.fuse_rms_norm, fusions.fuse_rotary, fusions.fuse_attention,
              fusions.fuse_attention_gqa, fusions.kv_scatter_to_tensor_scatter),
        fixups=(fixups.int_clip_to_min_max, fixups.drop_default_attention_attributes),
    ),
}

TARGETS: tuple[str, ...] = tuple(_TARGETS)  # ("ort", "trt-10.3", "trt-10.15")


def get_target(target: str) -> Target:
    try:
        return _TARGETS[target]
    except (KeyError, TypeError):
        raise TiDARError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}") from None


_PREPARED_KEY = "tidar_graphs.prepared"  # what prepare_weights fired, until lower reports it


def prepare_weights(model: ir.Model, target: str) -> int:
    """Run `target`'s weight passes on `model` (in place) before its weights are written.

    The exporter calls this on each traced graph while its weights are still unread (lazy
    checkpoint tensors): a fused weight replaces its parts, which are then never read or stored.
    The counts are kept in the model's metadata for `lower` to report. Returns the total count.
    """
    spec = get_target(target)
    fired = json.loads(model.metadata_props.get(_PREPARED_KEY, "{}"))
    for step in spec.weights:
        count = step(model)
        fired[step.__name__] = fired.get(step.__name__, 0) + count
        logger.info("%s: %s (before the weights are written) -> %d", spec.name, step.__name__, count)
    model.metadata_props[_PREPARED_KEY] = json.dumps(fired, sort_keys=True)
    return sum(fired.values())


def lower(model: onnx.ModelProto, target: str, kind: str | None = None, ar_step: str = "attention") -> onnx.ModelProto:
    """Cleanup, decomposition or fusion, and opset conversion of `model` for `target`.

    kind, ar_step: the graph `model` is and the AR step's form (`Target.form`), which add that
    graph's own passes after the fusions; kind None: the target's common passes only.
    The input proto is not modified. Raises TiDARError for an unknown target.
    """
    spec = get_target(target)
    own = spec.form(kind, ar_step).passes if kind is not None else ()
    ir_model = ir.serde.deserialize_model(model)
    fired: dict[str, int] = json.loads(ir_model.metadata_props.pop(_PREPARED_KEY, "{}"))

    def run(step: Pass) -> None:
        count = step(ir_model)
        fired[step.__name__] = fired.get(step.__name__, 0) + count
        logger.info("%s: %s -> %d", spec.name, step.__name__, count)

    run(cleanup.cleanup)
    for step in spec.weights:
        run(step)
    for step in spec.decompose:
        run(step)
    cleanup.convert_opset(ir_model, spec.opset)  # re-infers shapes when it converts
    for step in (*spec.fuse, *own):
        run(step)
    run(cleanup.cleanup)
    for step in spec.fixups:
        run(step)
    run(cleanup.tidy)
    ir_model.metadata_props["tidar_graphs.target"] = spec.name
    ir_model.metadata_props["tidar_graphs.passes"] = json.dumps(
        {k: v for k, v in fired.items() if k not in ("cleanup", "tidy")}, sort_keys=True)
    proto = ir.serde.serialize_model(ir_model)
    # The IR version the opsets need (ONNX's table: opset 23 -> IR 11, opset 24 -> IR 12); the
    # tracer's IR 10 would under-declare an opset-23/24 graph. Never lowered below the tracer's.
    proto.ir_version = max(proto.ir_version, onnx.helper.find_min_ir_version_for(proto.opset_import,
                                                                                ignore_unknown=True))
    return proto
