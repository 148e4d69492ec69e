"""Target fix-ups: exact rewrites that run after the final cleanup, for what a parser lacks.

They run last because `cleanup`'s default onnxscript rules would undo some of them
(Min(Max(x, lo), hi) becomes Clip again).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from tidar_graphs._match import INT_TYPES, apply, named_after


class IntClipToMinMax(pattern.RewriteRuleClassBase):
    """Clip on an integer tensor  ->  Min(Max(x, lo), hi).

    TensorRT's parser lists Clip for FP32/FP16/BF16 only, while Max and Min take INT32/INT64;
    the model clamps int64 slot offsets when it builds the cache mask.
    """

    def __init__(self):
        super().__init__("IntClipToMinMax", remove_nodes=False)

    def pattern(self, op, x):
        return op.Clip(x, pattern.Var("lo", can_match_none=True), pattern.Var("hi", can_match_none=True),
                       _outputs=["out"])

    def check(self, context, x, **_):
        return x.dtype in INT_TYPES

    def rewrite(self, op, x, out, lo=None, hi=None, **_):
        y = x if lo is None else named_after(op.Max(x, lo), out)
        return y if hi is None else named_after(op.Min(y, hi), out)


def int_clip_to_min_max(model: ir.Model) -> int:
    return apply([IntClipToMinMax.rule()], model, commute=False)


# Attributes TensorRT 10.15's parser lists as unsupported on Attention, with their defaults.
_ATTENTION_UNSUPPORTED_DEFAULTS = {"qk_matmul_output_mode": 0, "softcap": 0.0}


def drop_default_attention_attributes(model: ir.Model) -> int:
    """Remove Attention attributes that are set to their default (torch writes them out).

    The TensorRT 10.15 operator table lists `qk_matmul_output_mode` and `softcap` as
    unsupported; a default value changes nothing, so dropping it is exact.
    """
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        for name, default in _ATTENTION_UNSUPPORTED_DEFAULTS.items():
            attr = node.attributes.get(name)
            if attr is not None and attr.value == default:
                del node.attributes[name]
                count += 1
    return count
