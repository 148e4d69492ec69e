"""Cleanup passes and the opset conversion: folding, dead code, CSE, names, shapes.

Every pass in tidar_graphs takes an `onnx_ir.Model`, changes it in place and returns how many
times it fired (for the cleanup passes: the change in node count), so that a pipeline can log
what happened and tests can assert that a rewrite fired.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import onnxscript.rewriter
from onnxscript.version_converter import convert_version


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph)


def _has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def cleanup(model: ir.Model) -> int:
    """Constant folding, onnxscript's default rewrite rules, dead code, then `tidy`.

    The steps of `onnxscript.optimizer.optimize_ir`, assembled here so that no step reads
    weights: the tracers hand over graphs whose weights sit in an external file that may not
    be reachable from here (optimize_ir's initializer deduplication would read them).
    Returns the change in node count.
    """
    before = _node_count(model)
    common_passes.InlinePass()(model)
    for _ in range(2):
        count = _node_count(model)
        folded = onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
        onnxscript.rewriter.rewrite(model)  # default rules; removes unused nodes and opsets
        if not folded.modified and _node_count(model) == count:
            break
    tidy(model)
    return _node_count(model) - before


def tidy(model: ir.Model) -> int:
    """Dead code, constant lifting, CSE, unique names and shape inference; no rewrite rules.

    Runs after the target fix-ups: `cleanup`'s default onnxscript rules would turn
    Min(Max(x, lo), hi) back into Clip. Small initializers are deduplicated only when no
    weight lives in external data (deduplication reads the tensors it compares).
    """
    before = _node_count(model)
    steps = [
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
        common_passes.ShapeInferencePass(strict_mode=False),
    ]
    if not _has_external_data(model):
        steps.insert(2, common_passes.DeduplicateInitializersPass())
    ir.passes.Sequential(*steps)(model)
    return _node_count(model) - before


def infer_shapes(model: ir.Model) -> None:
    """ONNX shape inference (fills dtypes/shapes the rules check)."""
    common_passes.ShapeInferencePass(strict_mode=False)(model)


def convert_opset(model: ir.Model, opset: int) -> int:
    """Convert the default-domain opset (onnxscript converter, onnx C API as fallback).

    Returns 1 when the opset changed. Fused opset-23/24 ops have no down-conversion: run the
    decompositions first when lowering to an older opset.
    """
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if current == opset:
        return 0
    # onnxscript's converter only goes up; going down it warns and falls back to onnx's C API
    # ("The model version conversion is not supported by the onnxscript version converter and
    # fallback is enabled. ..."), which is the intended path here: keep that warning quiet.
    log = logging.getLogger("onnxscript.version_converter")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        convert_version(model, opset, fallback=True)
    finally:
        log.setLevel(level)
    infer_shapes(model)
    return 1
