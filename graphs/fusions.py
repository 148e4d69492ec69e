"""Fusions for the opset-23/24 targets: RMSNormalization, RotaryEmbedding, Attention (GQA), TensorScatter,
and the fused q/k/v projection (`fuse_projections`).

Fusions are onnxscript rewriter rules (`onnxscript.rewriter.pattern`), one class per pattern.
They are written for the graphs torch's dynamo exporter produces from
`tidar_export.model.transformer` (opset 18 or later; see docs/GRAPHS.md for the exact node
chains) and check shapes/constants before firing, so a graph that only looks similar is left alone.

Every `OrValue` names a `tag_var`: with `commute=True` onnxscript 0.7.2 clones patterns, and
cloning an untagged OrValue raises "ValueError: tag_var must be specified if tag_values is
provided." (BacktrackingOr.clone passes its default tag values back to the constructor).

Rules are built with `remove_nodes=False`: matched nodes often feed other consumers (the
cos/sin chain is shared by q and k, the mask by every layer), so a rule only redirects the
uses of the matched output and `cleanup` removes whatever became dead.

Semantics notes (why each rewrite is exact):
- SDPA fusion drops the exporter's `Where(IsNaN(p), 0, p)` guard. It only matters for a
  query row whose keys are all masked; TiDAR's masks always let a query see itself, so no
  row is fully masked. The decomposition for old targets puts the guard back.
- The GQA fusion relies on ONNX Attention repeating each KV head for q_num_heads/kv_num_heads
  consecutive query heads ([h0, h0, h1, h1, ...]), which is what the model's
  unsqueeze(2)/expand/reshape computes.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from tidar_graphs._match import (FLOAT_TYPES, apply, attr, axes_equal, compatible, const, dims, fail, ints,
                                 named_after, same, scalar, static)
from tidar_graphs.cleanup import infer_shapes


class RMSNormFusion(pattern.RewriteRuleClassBase):
    """scale * (x * 1/sqrt(mean(x^2, -1) + eps))  ->  RMSNormalization (opset 23).

    The model computes in float32 (`x.float()` ... `.to(dtype)`), so an optional Cast to float
    before and a Cast back after are part of the pattern; stash_type stays float32.
    """

    def __init__(self):
        super().__init__("RMSNormFusion", remove_nodes=False)

    def pattern(self, op, x_in, two, axes, eps, scale):
        x = pattern.OrValue([op.Cast(x_in), x_in], name="x", tag_var="upcast", tag_values=[True, False])
        rms = op.Sqrt(op.Add(op.ReduceMean(op.Pow(x, two), axes, keepdims=1), eps))
        normed = pattern.OrValue([op.Mul(x, op.Reciprocal(rms)), op.Div(x, rms)], tag_var="divide")
        normed = pattern.OrValue([op.Cast(normed), normed], tag_var="downcast", tag_values=[True, False])
        return op.Mul(scale, normed, _outputs=["out"])

    def check(self, context, x_in, x, two, axes, eps, scale, out, upcast, downcast, **_):
        rank = len(dims(x) or ())
        if upcast != downcast:
            return fail("the float32 round trip is not closed", x)
        if scalar(two) != 2:
            return fail("Pow exponent is not 2", two)
        if rank == 0 or not axes_equal(ints(axes), -1, rank):
            return fail("ReduceMean is not over the last axis", axes)
        if not isinstance(scalar(eps), float):
            return fail("epsilon is not a float constant", eps)
        if x.dtype != ir.DataType.FLOAT or x_in.dtype not in FLOAT_TYPES:
            return fail("normalization is not computed in float32", x)
        if scale.dtype not in FLOAT_TYPES or out.dtype != scale.dtype:
            return fail("scale/output dtypes do not match", scale, out)
        sdims, xdims = dims(scale), dims(x)
        if sdims is None or len(sdims) != 1 or not same(sdims[0], xdims[-1]):
            return fail("scale is not a vector over the last axis", scale)
        return True

    def rewrite(self, op, x_in, eps, scale, out, **_):
        return named_after(op.RMSNormalization(x_in, scale, axis=-1, epsilon=float(scalar(eps)),
                                                stash_type=int(ir.DataType.FLOAT)), out)


class RotaryFusion(pattern.RewriteRuleClassBase):
    """x*cos + rotate_half(x)*sin  ->  RotaryEmbedding(x, cos_cache, sin_cache) (opset 23).

    Half-split layout, 4-D x [B, H, T, hd]. cos/sin [B, 1, T, hd] are either computed in the
    graph as Unsqueeze(Cos/Sin(Concat(f, f)), 1) from the frequencies f = positions * inv_freq
    (the caches become Cos(f), Sin(f)), or constants, when the positions were constant and got
    folded (a static prefill): then the caches are their first halves.
    """

    def __init__(self):
        super().__init__("RotaryFusion", remove_nodes=False)

    def pattern(self, op, x, cos, sin, s1, e1, a1, st1, s2, e2, a2, st2):
        first = op.Slice(x, s1, e1, a1, st1)
        second = op.Slice(x, s2, e2, a2, st2)
        rotated = op.Concat(op.Neg(second), first, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin), _outputs=["out"])

    def check(self, context, x, cos, sin, s1, e1, a1, st1, s2, e2, a2, st2, **_):
        xd = dims(x)
        if xd is None or len(xd) != 4 or not static(xd[3]):
            return fail("x is not 4-D [B, H, T, hd] with a static head size", x)
        hd = xd[3]
        for axes, steps in ((a1, st1), (a2, st2)):
            if not axes_equal(ints(axes), 3, 4) or ints(steps) != [1]:
                return fail("slices are not unit-step slices of the last axis", axes, steps)
        first, second = (ints(s1), ints(e1)), (ints(s2), ints(e2))
        if first != ([0], [hd // 2]) or second[0] != [hd // 2] or second[1] is None or second[1][0] < hd:
            return fail("x is not split into its two halves", s1, e1, s2, e2)
        self._freqs = self._computed_freqs(cos, sin)
        if self._freqs is not None:
            fd = dims(self._freqs)
            if fd is None or len(fd) != 3 or not (same(fd[0], xd[0]) and same(fd[1], xd[2])) or fd[2] != hd // 2:
                return fail("frequencies are not [B, T, hd/2]", self._freqs)
            return True
        tables = [const(cos), const(sin)]
        if any(t is None or t.ndim != 4 or t.shape[1] != 1 or t.shape[3] != hd for t in tables):
            return fail("cos/sin are neither computed from frequencies nor [B, 1, T, hd] constants", cos, sin)
        fits = all(t.shape[0] in (1, xd[0]) and t.shape[2] == xd[2] for t in tables)
        if not (static(xd[0]) and static(xd[2]) and fits):
            return fail("constant cos/sin do not match a static [B, T]", cos, sin)
        if any(not np.array_equal(t[..., : hd // 2], t[..., hd // 2:]) for t in tables):
            return fail("constant cos/sin are not in the half-split layout", cos, sin)
        self._tables = [np.ascontiguousarray(np.broadcast_to(t[:, 0, :, : hd // 2], (xd[0], xd[2], hd // 2)))
                        for t in tables]
        return True

    @staticmethod
    def _computed_freqs(cos: ir.Value, sin: ir.Value) -> ir.Value | None:
        """f when cos = Unsqueeze([Cast](Cos(Concat(f, f, axis=-1))), [1]) and sin likewise.

        The Cast is there in fp16/bf16 graphs (cos/sin are computed in float32, then cast).
        """
        found = []
        for value, fn in ((cos, "Cos"), (sin, "Sin")):
            unsq = value.producer()
            if unsq is None or unsq.op_type != "Unsqueeze" or ints(unsq.inputs[1]) != [1]:
                return None
            trig = unsq.inputs[0].producer()
            if trig is not None and trig.op_type == "Cast":
                trig = trig.inputs[0].producer()
            if trig is None or trig.op_type != fn:
                return None
            cat = trig.inputs[0].producer()
            if cat is None or cat.op_type != "Concat" or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
                return None
            rank = len(dims(cat.inputs[0]) or ())
            if rank == 0 or attr(cat, "axis") % rank != rank - 1:
                return None
            found.append(cat.inputs[0])
        return found[0] if found[0] is found[1] else None

    def rewrite(self, op, x, out, **_):
        if self._freqs is not None:
            cos, sin = op.Cos(self._freqs), op.Sin(self._freqs)
            if x.dtype != self._freqs.dtype:
                cos, sin = op.Cast(cos, to=x.dtype), op.Cast(sin, to=x.dtype)
        else:
            cos, sin = (op.Constant(value=ir.tensor(t.astype(x.dtype.numpy()))) for t in self._tables)
        return named_after(op.RotaryEmbedding(x, cos, sin, interleaved=0), out)


class AttentionFusion(pattern.RewriteRuleClassBase):
    """The exporter's SDPA decomposition  ->  Attention (opset 23, 4-D Q/K/V, optional mask).

    Matches MatMul(q*s_q, kT*s_k) (+ bias) -> Softmax -> [Where(IsNaN)] -> MatMul(., v), where
    kT is K with its last two axes swapped, either by a 4-D Transpose or by the exporter's
    3-D Reshape/Transpose/Reshape. A bias Where(mask, 0, -inf or finfo.min) becomes the boolean
    mask; any other float bias is passed as an additive mask.
    """

    def __init__(self):
        super().__init__("AttentionFusion", remove_nodes=False)

    def pattern(self, op, q, k_src, v, q_scale, k_scale, bias, nan_fill):
        kt4 = op.Transpose(k_src, perm=[0, 1, 3, 2])
        k3 = op.Reshape(k_src, pattern.ANY_VALUE, _outputs=["k3"])
        kt3 = op.Reshape(op.Transpose(k3, perm=[0, 2, 1]), pattern.ANY_VALUE)
        kt = pattern.OrValue([kt4, kt3], name="kt", tag_var="k_layout", tag_values=["4d", "3d"])
        qs = pattern.OrValue([op.Mul(q, q_scale), q], tag_var="q_scaled", tag_values=[True, False])
        ks = pattern.OrValue([op.Mul(kt, k_scale), kt], tag_var="k_scaled", tag_values=[True, False])
        scores = op.MatMul(qs, ks)
        scores = pattern.OrValue([op.Add(scores, bias), scores], tag_var="masked", tag_values=[True, False])
        probs = op.Softmax(scores, axis=-1)
        probs = pattern.OrValue([op.Where(op.IsNaN(probs), nan_fill, probs), probs], tag_var="nan_guard")
        return op.MatMul(probs, v, _outputs=["out"])

    def check(self, context, q, k_src, v, kt, k_layout, q_scaled, k_scaled, masked, **b):
        qd, vd, ktd = dims(q), dims(v), dims(kt)
        if qd is None or vd is None or ktd is None or not (len(qd) == len(vd) == len(ktd) == 4):
            return fail("q, v and K^T are not all 4-D", q, v, kt)
        B, H, _, D = qd
        if not (static(H) and static(D)):
            return fail("heads and head size must be static", q)
        if not (same(ktd[0], B) and ktd[1] == H and ktd[2] == D and same(vd[0], B) and vd[1] == H):
            return fail("K^T / V are not [B, H, hd, S] / [B, H, S, dv]", kt, v)
        S = ktd[3]
        if not same(vd[2], S):
            return fail("K and V sequence lengths differ", kt, v)
        kd = dims(k_src)
        is_bhsd = kd is not None and len(kd) == 4 and same(kd[0], B) and kd[1] == H and same(kd[2], S) and kd[3] == D
        if k_layout == "4d" or is_bhsd:
            if not is_bhsd:
                return fail("K is not [B, H, S, hd]", k_src)
            self._k_shape = None  # K is used as it is
        else:
            k3d = dims(b["k3"])
            if k3d is None or len(k3d) != 3 or not (same(k3d[1], S) and k3d[2] == D):
                return fail("K is not flattened to [B*H, S, hd]", b["k3"])
            if kd is None or len(kd) < 3 or not (same(kd[-2], S) and kd[-1] == D):
                return fail("K source does not end in [S, hd]", k_src)
            lead = kd[:-2]
            if len(lead) >= 2 and same(lead[0], B) and all(map(static, lead[1:])) and math.prod(lead[1:]) == H:
                batch = B if static(B) else 0  # Reshape's 0 copies K's own batch dim
            elif len(lead) == 1 and static(lead[0]) and static(B) and lead[0] == B * H:
                batch = B
            else:
                return fail("K source does not flatten to [B*H, S, hd]", k_src)
            self._k_shape = [batch, H, S if static(S) else -1, D]
        scale = 1.0
        for tagged, name in ((q_scaled, "q_scale"), (k_scaled, "k_scale")):
            if tagged:
                s = scalar(b.get(name))
                if not isinstance(s, float):
                    return fail(f"{name} is not a float constant", b.get(name))
                scale *= s
        self._scale = scale
        self._mask = None
        if masked:
            bias = b["bias"]
            mask = self._bool_mask(bias)
            self._mask = mask if mask is not None else bias
            md = dims(self._mask)
            if md is None or len(md) != 4:
                return fail("mask is not 4-D", self._mask)
            if mask is None and bias.dtype not in FLOAT_TYPES:
                return fail("bias is not float", bias)
        fill = b.get("nan_fill")
        if fill is not None and scalar(fill) != 0:
            return fail("NaN guard does not fill zeros", fill)
        return True

    @staticmethod
    def _bool_mask(bias: ir.Value) -> ir.Value | None:
        """mask for a bias Where(mask, 0, NEG); None for any other bias.

        NEG is -inf or the lowest finite value of the bias dtype (torch's exporter writes
        finfo.min). For a row with at least one visible key both give exactly zero weight to
        the masked keys, as a boolean mask does.
        """
        node = bias.producer()
        if node is None or node.op_type != "Where" or len(node.inputs) != 3:
            return None
        cond, zero, neg = node.inputs
        if cond is None or cond.dtype != ir.DataType.BOOL or bias.dtype not in FLOAT_TYPES:
            return None
        lowest = float(np.finfo(bias.dtype.numpy()).min) if bias.dtype != ir.DataType.BFLOAT16 else -3.3895e38
        neg_value = scalar(neg)
        if scalar(zero) != 0 or neg_value is None or not (neg_value == -math.inf or neg_value <= lowest):
            return None
        return cond

    def rewrite(self, op, q, k_src, v, out, **_):
        k = k_src if self._k_shape is None else op.Reshape(
            k_src, op.Constant(value=ir.tensor(np.array(self._k_shape, dtype=np.int64))))
        inputs = [q, k, v] + ([self._mask] if self._mask is not None else [])
        return named_after(op.Attention(*inputs, scale=float(self._scale)), out)


class AttentionGQAFusion(pattern.RewriteRuleClassBase):
    """Attention over K/V repeated per query head  ->  Attention over the KV heads (GQA).

    K/V enter as Reshape(Expand(Unsqueeze(kv, 2), [B, KV, rep, S, hd]), [B, H, S, hd]); ONNX
    Attention repeats KV heads the same way, so the expansion is dropped.
    """

    def __init__(self):
        super().__init__("AttentionGQAFusion", remove_nodes=False)

    def pattern(self, op, q, k, v, ak, av, sk5, sk4, sv5, sv4):
        kx = op.Reshape(op.Expand(op.Unsqueeze(k, ak), sk5, _outputs=["k5"]), sk4)
        vx = op.Reshape(op.Expand(op.Unsqueeze(v, av), sv5, _outputs=["v5"]), sv4)
        return op.Attention(q, kx, vx, pattern.Var("mask", can_match_none=True), _outputs=["out"])

    def check(self, context, q, k, v, ak, av, k5, v5, out, **_):
        if ints(ak) != [2] or ints(av) != [2]:
            return fail("K/V are not unsqueezed at axis 2", ak, av)
        qd, kd, vd = dims(q), dims(k), dims(v)
        if qd is None or kd is None or vd is None or not (len(qd) == len(kd) == len(vd) == 4):
            return fail("q, k, v are not 4-D", q, k, v)
        H, KV = qd[1], kd[1]
        if not (static(H) and static(KV)) or KV != vd[1] or H % KV:
            return fail("query heads are not a multiple of the KV heads", q, k)
        rep = H // KV
        for src, expanded in ((k, k5), (v, v5)):
            sd, ed = dims(src), dims(expanded)
            want = (sd[0], KV, rep, sd[2], sd[3])
            if ed is None or len(ed) != 5 or not all(compatible(a, w) for a, w in zip(ed, want)):
                return fail("K/V are not expanded to [B, KV, H/KV, S, hd]", expanded)
        node = out.producer()
        if any(name in node.attributes for name in ("q_num_heads", "kv_num_heads")):
            return fail("3-D head attributes on a 4-D Attention", out)
        return True

    def rewrite(self, op, q, k, v, out, mask=None, **_):
        attrs = dict(out.producer().attributes)
        inputs = [q, k, v] + ([mask] if mask is not None else [])
        return named_after(op.Attention(*inputs, **attrs), out)


class KVScatterToTensorScatter(pattern.RewriteRuleClassBase):
    """past.scatter(2, (L[:, None] + arange(T)) expanded, new)  ->  TensorScatter (opset 24).

    The model writes this pass's K/V at slots L..L+T-1 of the preallocated cache with
    `torch.scatter` along the sequence axis; the exporter emits ScatterElements with an index
    built from cache_len. TensorScatter(past, new, cache_len, axis=-2, mode="linear") is the
    same write and lets TensorRT update the cache in place.
    """

    def __init__(self):
        super().__init__("KVScatterToTensorScatter", remove_nodes=False)

    def pattern(self, op, past, update, cache_len, ax_l, arange, ax_i, shape):
        slots = op.Add(op.Unsqueeze(cache_len, ax_l), arange)
        index = op.Expand(op.Unsqueeze(slots, ax_i), shape, _outputs=["index"])
        return op.ScatterElements(past, index, update, _outputs=["out"])

    def check(self, context, past, update, cache_len, ax_l, arange, ax_i, index, out, **_):
        node = out.producer()
        pd, ud, ld = dims(past), dims(update), dims(cache_len)
        if pd is None or ud is None or len(pd) != 4 or len(ud) != 4:
            return fail("cache and update are not 4-D", past, update)
        if attr(node, "axis", 0) % 4 != 2 or attr(node, "reduction", "none") != "none":
            return fail("not a plain scatter along axis 2", out)
        if ld is None or len(ld) != 1 or cache_len.dtype != ir.DataType.INT64 or not same(ld[0], pd[0]):
            return fail("cache_len is not int64 [B]", cache_len)
        if ints(ax_l) not in ([1], [-1]) or ints(ax_i) != [1, 3]:
            return fail("index is not cache_len[:, None, :, None]", ax_l, ax_i)
        T = ud[2]
        if not static(T) or ints(arange) != list(range(T)):
            return fail("offsets are not arange(T)", arange)
        if not all(same(a, b) for i, (a, b) in enumerate(zip(pd, ud)) if i != 2):
            return fail("cache and update differ outside the sequence axis", past, update)
        idx = dims(index)
        if idx is None or not all(same(a, b) for a, b in zip(idx, ud)):
            return fail("index does not cover the update", index)
        return True

    def rewrite(self, op, past, update, cache_len, out, **_):
        return named_after(op.TensorScatter(past, update, cache_len, axis=-2, mode="linear"), out)


def fuse_rms_norm(model: ir.Model) -> int:
    return apply([RMSNormFusion.rule()], model)


def fuse_rotary(model: ir.Model) -> int:
    return apply([RotaryFusion.rule()], model)


def fuse_attention(model: ir.Model) -> int:
    return apply([AttentionFusion.rule()], model)


def fuse_attention_gqa(model: ir.Model) -> int:
    return apply([AttentionGQAFusion.rule()], model, commute=False)


def kv_scatter_to_tensor_scatter(model: ir.Model) -> int:
    return apply([KVScatterToTensorScatter.rule()], model)


# --------------------------------------------------------------------------- fused projections

# The [in, out] weights the tracer names after the module ("model.layers.0.self_attn.q_proj.weight.T")
_PROJECTION = re.compile(r"^(?P<module>(?:.+\.)?layers\.\d+\.(?:self_attn|mlp))\.(?P<proj>[a-z]+)_proj\.weight\.T$")
# fused name -> its parts, in the order of the concatenated output columns. q/k/v only: a fused
# gate/up measured slower on the demo model (ORT 1.32 CPU, one thread; docs/GRAPHS.md): the Split
# of its [B, T, 2 * intermediate] output costs more than the second MatMul it saves (+1.5 to +3.7%
# on the width-72 step, no gain on the AR step). The pass takes {"gate_up": ("gate", "up")} too.
FUSED_PROJECTIONS = {"qkv": ("q", "k", "v")}
_FAMILY = {part: fused for fused, parts in FUSED_PROJECTIONS.items() for part in parts}


class _Concatenated(ir.LazyTensor):
    """The concatenation of `parts` along the last axis, read only when it is serialized or
    written (the exporter writes it to its weights file; the parts are never read otherwise)."""

    __slots__ = ("parts", "source_key")

    def __init__(self, parts: list, name: str):
        self.parts = list(parts)  # read by the exporter to make the same tensor of another layer
        shape = [*parts[0].shape.numpy()[:-1], sum(int(t.shape.numpy()[-1]) for t in parts)]
        dtype = parts[0].dtype
        super().__init__(lambda: ir.Tensor(np.concatenate([np.asarray(t.numpy()) for t in parts], axis=-1),
                                           dtype=dtype), dtype=dtype, shape=ir.Shape(shape), name=name)
        # The exporter's streamed checkpoint tensors carry a source_key (tidar_export.export.artifact):
        # the fused tensor gets one too, so that the weights file reads it once for the three graphs.
        keys = [getattr(t, "source_key", None) for t in parts]
        self.source_key = ("concat", *keys) if all(k is not None for k in keys) else None


def _readable(tensor) -> bool:
    """Whether a tensor's data can be read (the passes never read weights that are out of reach)."""
    if isinstance(tensor, ir.ExternalTensor):
        return os.path.isfile(tensor.path)
    return tensor is not None


def _sole_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output() and not value.is_graph_input()


def _bias_add(out: ir.Value, width: int) -> tuple[ir.Node, ir.Value] | None:
    """(Add, bias) when `out` is read by exactly one Add(out, bias) with bias a 1-D constant [width]."""
    users = out.consumers()
    if len(users) != 1 or out.is_graph_output():
        return None
    add = users[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    bias = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if bias is None or not bias.is_initializer() or not _sole_use(bias) or bias.const_value is None:
        return None
    if list(bias.const_value.shape.numpy()) != [width] or add.outputs[0].is_graph_output():
        return None
    return add, bias


def _scope(module: str) -> str:
    """"model.layers.0.self_attn.qkv_proj" -> "/model/layers.0/self_attn/qkv_proj" (the tracer's node names)."""
    return "/" + re.sub(r"\.(?!\d)", "/", module)


def fuse_projections(model: ir.Model) -> int:
    """q/k/v MatMuls of one activation  ->  one MatMul and a Split (each group of FUSED_PROJECTIONS).

    MatMul(x, W_q), MatMul(x, W_k), MatMul(x, W_v) with constant [in, out] weights named after
    their modules (`model.layers.N.self_attn.{q,k,v}_proj.weight.T`, as the tracer names them)
    become MatMul(x, concat(W_q, W_k, W_v, axis=-1)) followed by Split(axis=-1) into the three
    widths; their bias Adds (Qwen2) become one Add of the concatenated biases before the Split.
    The fused weight is `model.layers.N.self_attn.qkv_proj.weight.T` (a group "gate_up" would make
    `mlp.gate_up_proj.weight.T`), a lazy concatenation that reads the parts only when it is
    written; the parts leave the graph. Nodes are named in the fused module's scope
    (`/model/layers.N/self_attn/qkv_proj/MatMul`, `/Add`, `/Split`). Exact: each output column is
    the same dot product as before. A group is left alone when a part is missing, a weight is
    read elsewhere too, or a weight's data is out of reach (external data not found).
    """
    g = model.graph
    groups: dict[tuple, dict[str, ir.Node]] = {}  # (activation, module, fused name) -> part -> MatMul
    first: dict[tuple, ir.Node] = {}  # the group's first MatMul in graph order: the fused nodes go before it
    for node in g:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        x, w = node.inputs
        m = _PROJECTION.match(w.name or "") if w is not None and w.is_initializer() else None
        if m is None or m["proj"] not in _FAMILY or x is None:
            continue
        key = (id(x), m["module"], _FAMILY[m["proj"]])
        groups.setdefault(key, {}).setdefault(m["proj"], node)
        first.setdefault(key, node)
    count = 0
    for key in groups:
        _, module, family = key
        parts = FUSED_PROJECTIONS[family]
        members = groups[key]
        if set(members) != set(parts):
            continue
        nodes = [members[p] for p in parts]
        weights = [n.inputs[1] for n in nodes]
        tensors = [w.const_value for w in weights]
        if (len({id(w) for w in weights}) != len(weights) or not all(map(_sole_use, weights))
                or not all(map(_readable, tensors)) or any(o.is_graph_output() for n in nodes for o in n.outputs)):
            continue
        shapes = [tuple(t.shape.numpy()) for t in tensors]
        if any(len(s) != 2 for s in shapes) or len({s[0] for s in shapes}) != 1 or len({t.dtype for t in tensors}) != 1:
            continue
        widths = [s[1] for s in shapes]
        name = f"{module}.{family}_proj"
        if f"{name}.weight.T" in g.initializers:
            continue
        biases = [_bias_add(n.outputs[0], width) for n, width in zip(nodes, widths)]
        if not all(biases) or not all(_readable(b[1].const_value) for b in biases) or len(
                {b[1].const_value.dtype for b in biases}) != 1:
            biases = [None] * len(nodes)  # any Adds stay on the Split outputs
        scope = _scope(name)
        x = nodes[0].inputs[0]
        fused_w = ir.Value(name=f"{name}.weight.T", shape=ir.Shape([shapes[0][0], sum(widths)]),
                           type=ir.TensorType(tensors[0].dtype), const_value=_Concatenated(tensors, f"{name}.weight.T"))
        g.register_initializer(fused_w)
        block = [ir.Node("", "MatMul", [x, fused_w], name=f"{scope}/MatMul")]
        out = block[-1].outputs[0]
        out.dtype = tensors[0].dtype
        olds = [n.outputs[0] for n in nodes]
        if biases[0] is not None:
            bias_t = [b[1].const_value for b in biases]
            fused_b = ir.Value(name=f"{name}.bias", shape=ir.Shape([sum(widths)]), type=ir.TensorType(bias_t[0].dtype),
                               const_value=_Concatenated(bias_t, f"{name}.bias"))
            g.register_initializer(fused_b)
            block.append(ir.Node("", "Add", [out, fused_b], name=f"{scope}/Add"))
            out = block[-1].outputs[0]
            out.dtype = tensors[0].dtype
            olds = [b[0].outputs[0] for b in biases]
        sizes = ir.Value(name=f"{name}.split", shape=ir.Shape([len(widths)]), type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(np.array(widths, np.int64), name=f"{name}.split"))
        g.register_initializer(sizes)
        split = ir.Node("", "Split", [out, sizes], attributes=[ir.AttrInt64("axis", -1)], num_outputs=len(widths),
                        name=f"{scope}/Split")
        block.append(split)
        g.insert_before(first[key], block)
        for old, new in zip(olds, split.outputs):
            new.dtype, new.shape = old.dtype, old.shape
            value_name = old.name  # downstream keeps reading the same tensor names
            old.replace_all_uses_with(new)
            old.name = f"{value_name}.unfused"
            new.name = value_name
        dead = nodes + [b[0] for b in biases if b is not None]
        g.remove(dead, safe=True)
        for w in weights + [b[1] for b in biases if b is not None]:
            del g.initializers[w.name]
        count += 1
    if count:
        infer_shapes(model)
    return count
