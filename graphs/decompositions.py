"""Decompositions for targets without the opset-23/24 ops (TensorRT 10.3; the ORT cache write).

Each rule turns one fused op back into the opset-18 chain it stands for, with the same
numerics as the ONNX reference (tests/test_graphs.py checks each in ONNX Runtime). Like the
fusions they are built with `remove_nodes=False`; `cleanup` removes what became dead.
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

from tidar_graphs._match import FLOAT_TYPES, apply, attr, dims, f, fail, i64, static


class AttentionDecomposition(pattern.RewriteRuleClassBase):
    """Attention (4-D, no cache inputs, not causal)  ->  MatMul / Softmax / MatMul.

    KV heads are repeated with Unsqueeze/Expand/Reshape as ONNX Attention defines; a boolean
    mask becomes Where(mask, 0, -inf) added to the scores; fully masked rows give zeros (the
    Where(IsNaN) guard), as the ONNX reference does.
    """

    def __init__(self):
        super().__init__("AttentionDecomposition", remove_nodes=False)

    def pattern(self, op, q, k, v):
        return op.Attention(q, k, v, pattern.Var("mask", can_match_none=True), _outputs=["out"])

    def check(self, context, q, k, v, out, mask=None, **_):
        node = out.producer()
        qd, kd, vd = dims(q), dims(k), dims(v)
        if qd is None or kd is None or vd is None or not (len(qd) == len(kd) == len(vd) == 4):
            return fail("only 4-D Attention is decomposed", q)
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return fail("present/qk outputs are used", out)
        if attr(node, "is_causal", 0) or attr(node, "softcap", 0.0) or attr(node, "qk_matmul_output_mode", 0):
            return fail("causal / softcap / qk-output attributes are not decomposed", out)
        for name in ("left_window_size", "right_window_size"):
            if attr(node, name, -1) != -1:
                return fail("sliding windows are not decomposed", out)
        H, KV = qd[1], kd[1]
        if not (static(H) and static(KV)) or H % KV or vd[1] != KV:
            return fail("static heads with q_heads % kv_heads == 0 are needed", q, k)
        if KV != H and not (static(kd[3]) and static(vd[3])):
            return fail("repeating KV heads needs static head sizes", k, v)
        if mask is not None and mask.dtype not in (ir.DataType.BOOL, *FLOAT_TYPES):
            return fail("mask is neither boolean nor float", mask)
        self._scale = attr(node, "scale", None)
        if self._scale is None:
            if not static(qd[3]):
                return fail("head size must be static for the default scale", q)
            self._scale = 1.0 / math.sqrt(qd[3])
        return True

    def rewrite(self, op, q, k, v, out, mask=None, **_):
        dtype = q.dtype
        H, KV = dims(q)[1], dims(k)[1]

        def repeat(x):
            if KV == H:
                return x
            D = dims(x)[3]
            shape5 = op.Concat(op.Shape(x, start=0, end=1), i64(op, [KV, H // KV]),
                               op.Shape(x, start=2, end=4), axis=0)
            x5 = op.Expand(op.Unsqueeze(x, i64(op, [2])), shape5)
            return op.Reshape(x5, i64(op, [0, H, -1, D]))

        kt = op.Transpose(repeat(k), perm=[0, 1, 3, 2])
        scores = op.Mul(op.MatMul(q, kt), f(op, self._scale, dtype))
        if mask is not None:
            bias = mask if mask.dtype != ir.DataType.BOOL else op.Where(
                mask, f(op, 0.0, dtype), f(op, -math.inf, dtype))
            scores = op.Add(scores, bias)
        probs = op.Softmax(scores, axis=-1)
        if mask is not None:
            probs = op.Where(op.IsNaN(probs), f(op, 0.0, dtype), probs)
        return op.MatMul(probs, repeat(v))


class RMSNormDecomposition(pattern.RewriteRuleClassBase):
    """RMSNormalization  ->  Pow / ReduceMean / Add / Sqrt / Reciprocal / Mul (stash in float32)."""

    def __init__(self):
        super().__init__("RMSNormDecomposition", remove_nodes=False)

    def pattern(self, op, x, scale):
        return op.RMSNormalization(x, scale, _outputs=["out"])

    def check(self, context, x, out, **_):
        node = out.producer()
        rank = len(dims(x) or ())
        if rank == 0:
            return fail("input rank unknown", x)
        if attr(node, "stash_type", 1) != int(ir.DataType.FLOAT) or x.dtype not in FLOAT_TYPES:
            return fail("only float32 stash is decomposed", out)
        self._axes = list(range(attr(node, "axis", -1) % rank, rank))
        self._eps = float(attr(node, "epsilon", 1e-5))
        return True

    def rewrite(self, op, x, scale, out, **_):
        xf = x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)
        ms = op.ReduceMean(op.Pow(xf, f(op, 2.0, ir.DataType.FLOAT)), i64(op, self._axes), keepdims=1)
        normed = op.Mul(xf, op.Reciprocal(op.Sqrt(op.Add(ms, f(op, self._eps, ir.DataType.FLOAT)))))
        if out.dtype != ir.DataType.FLOAT:
            normed = op.Cast(normed, to=out.dtype)
        return op.Mul(scale, normed)


class RotaryDecomposition(pattern.RewriteRuleClassBase):
    """RotaryEmbedding (4-D x, half-split, full rotary dim)  ->  Slice / Neg / Concat / Mul / Add."""

    def __init__(self):
        super().__init__("RotaryDecomposition", remove_nodes=False)

    def pattern(self, op, x, cos, sin):
        return op.RotaryEmbedding(x, cos, sin, pattern.Var("position_ids", can_match_none=True),
                                  _outputs=["out"])

    def check(self, context, x, cos, out, position_ids=None, **_):
        node = out.producer()
        xd = dims(x)
        if xd is None or len(xd) != 4 or not static(xd[3]):
            return fail("only 4-D x with a static head size is decomposed", x)
        if attr(node, "interleaved", 0) or attr(node, "rotary_embedding_dim", 0) not in (0, xd[3]):
            return fail("interleaved / partial rotary is not decomposed", out)
        return True

    def rewrite(self, op, x, cos, sin, position_ids=None, **_):
        hd = dims(x)[3]

        def table(t):  # [B, T, hd/2] -> [B, 1, T, hd]
            if position_ids is not None:
                t = op.Gather(t, position_ids, axis=0)
            return op.Unsqueeze(op.Concat(t, t, axis=-1), i64(op, [1]))

        first = op.Slice(x, i64(op, [0]), i64(op, [hd // 2]), i64(op, [3]), i64(op, [1]))
        second = op.Slice(x, i64(op, [hd // 2]), i64(op, [hd]), i64(op, [3]), i64(op, [1]))
        rotated = op.Concat(op.Neg(second), first, axis=-1)
        return op.Add(op.Mul(x, table(cos)), op.Mul(rotated, table(sin)))


class TensorScatterDecomposition(pattern.RewriteRuleClassBase):
    """TensorScatter (linear mode)  ->  ScatterElements with index write_indices[b] + t."""

    def __init__(self):
        super().__init__("TensorScatterDecomposition", remove_nodes=False)

    def pattern(self, op, past, update, write_indices):
        return op.TensorScatter(past, update, write_indices, _outputs=["out"])

    def check(self, context, past, update, out, **_):
        node = out.producer()
        ud = dims(update)
        if ud is None or attr(node, "mode", "linear") != "linear":
            return fail("only linear mode with a known update rank is decomposed", out)
        axis = attr(node, "axis", -2) % len(ud)
        if axis == 0 or not static(ud[axis]):
            return fail("the write axis must be static and not the batch axis", update)
        self._axis = axis
        return True

    def rewrite(self, op, past, update, write_indices, **_):
        ud = dims(update)
        rank, axis, T = len(ud), self._axis, ud[self._axis]
        slots = op.Add(op.Unsqueeze(write_indices, i64(op, [1])), i64(op, list(range(T))))  # [B, T]
        other = [d for d in range(1, rank) if d != axis]
        index = op.Expand(op.Unsqueeze(slots, i64(op, other)) if other else slots, op.Shape(update))
        return op.ScatterElements(past, index, update, axis=axis)


def decompose_attention(model: ir.Model) -> int:
    return apply([AttentionDecomposition.rule()], model, commute=False)


def decompose_rms_norm(model: ir.Model) -> int:
    return apply([RMSNormDecomposition.rule()], model, commute=False)


def decompose_rotary(model: ir.Model) -> int:
    return apply([RotaryDecomposition.rule()], model, commute=False)


def decompose_tensor_scatter(model: ir.Model) -> int:
    return apply([TensorScatterDecomposition.rule()], model, commute=False)
