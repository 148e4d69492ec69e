"""Graph passes over onnx_ir models: cleanup, fusions, the in-place KV write, decompositions.

Every pass takes an `onnx_ir.Model`, changes it in place and returns how many times it
fired, so that a pipeline can log what happened and tests can assert that a fusion fired.
Fusions and decompositions are onnxscript rewriter rules (`onnxscript.rewriter.pattern`), one
class per pattern. They are written for the graphs torch's dynamo exporter produces from
`tidar_export.model.transformer` (opset 18 or later; see docs/GRAPHS.md for the exact node chains) and
check shapes/constants before firing, so a graph that only looks similar is left alone.

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

import logging
import math

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import onnxscript.rewriter
from onnxscript.rewriter import pattern
from onnxscript.version_converter import convert_version

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
_INT_TYPES = (ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
              ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64)


# --------------------------------------------------------------------------------------------
# Small helpers on onnx_ir values
# --------------------------------------------------------------------------------------------

def _const(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind a value (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("value")
            if attr is not None:
                tensor = attr.as_tensor()
    if tensor is None:
        return None
    try:
        return np.asarray(tensor.numpy())
    except OSError:  # external data that is not reachable from here: treat as unknown
        return None


def _scalar(value: ir.Value | None):
    arr = _const(value)
    if arr is None or arr.size != 1:
        return None
    return arr.reshape(()).item()


def _ints(value: ir.Value | None) -> list[int] | None:
    arr = _const(value)
    if arr is None or arr.dtype.kind not in "iu":
        return None
    return [int(x) for x in arr.reshape(-1)]


def _dims(value: ir.Value | None) -> tuple | None:
    """Shape as a tuple of ints / ir.SymbolicDim, or None when the rank is unknown."""
    if value is None or value.shape is None:
        return None
    return tuple(value.shape)


def _static(dim) -> bool:
    return isinstance(dim, int)


def _same(a, b) -> bool:
    """Two dims known to be equal: equal ints, or the same named symbolic dim."""
    if _static(a) or _static(b):
        return a == b
    return a.value is not None and a.value == b.value


def _compatible(a, b) -> bool:
    """Equal static dims, or two symbolic dims (possibly under different names).

    The tracers rename dims on graph outputs ("prompt_len + 4" becomes "prefill_len") while
    the same dim inside the graph keeps the exporter's name, so names cannot be compared
    across a graph output.
    """
    if _static(a) or _static(b):
        return a == b
    return True


def _axes_equal(axes: list[int] | None, expected: int, rank: int) -> bool:
    return axes is not None and len(axes) == 1 and axes[0] % rank == expected % rank


def _fail(reason: str, *values):
    return pattern.MatchResult().fail(reason, list(values) or None)


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _named_after(new: ir.Value, old: ir.Value) -> ir.Value:
    """Name the node producing `new` in the module scope of the node it replaces.

    Traced graphs name nodes by module path ("/model/layers.0/self_attn/MatMul_3"); the fused
    node becomes "/model/layers.0/self_attn/Attention" (the final cleanup makes names unique).
    Names without a scope are left to the rewriter's default.
    """
    node, old_node = new.producer(), old.producer()
    if node is not None and old_node is not None and "/" in (old_node.name or ""):
        node.name = f"{old_node.name.rsplit('/', 1)[0]}/{node.op_type}"
    return new


# --------------------------------------------------------------------------------------------
# Cleanup and opset conversion
# --------------------------------------------------------------------------------------------

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


def _apply(rules: list[pattern.RewriteRule], model: ir.Model, commute: bool = True) -> int:
    count = pattern.RewriteRuleSet(rules, commute=commute).apply_to_model(model)
    if count:
        infer_shapes(model)
    return count


# --------------------------------------------------------------------------------------------
# Fusions (opset >= 23 / 24 targets)
# --------------------------------------------------------------------------------------------

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
        rank = len(_dims(x) or ())
        if upcast != downcast:
            return _fail("the float32 round trip is not closed", x)
        if _scalar(two) != 2:
            return _fail("Pow exponent is not 2", two)
        if rank == 0 or not _axes_equal(_ints(axes), -1, rank):
            return _fail("ReduceMean is not over the last axis", axes)
        if not isinstance(_scalar(eps), float):
            return _fail("epsilon is not a float constant", eps)
        if x.dtype != ir.DataType.FLOAT or x_in.dtype not in _FLOAT_TYPES:
            return _fail("normalization is not computed in float32", x)
        if scale.dtype not in _FLOAT_TYPES or out.dtype != scale.dtype:
            return _fail("scale/output dtypes do not match", scale, out)
        sdims, xdims = _dims(scale), _dims(x)
        if sdims is None or len(sdims) != 1 or not _same(sdims[0], xdims[-1]):
            return _fail("scale is not a vector over the last axis", scale)
        return True

    def rewrite(self, op, x_in, eps, scale, out, **_):
        return _named_after(op.RMSNormalization(x_in, scale, axis=-1, epsilon=float(_scalar(eps)),
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
        xd = _dims(x)
        if xd is None or len(xd) != 4 or not _static(xd[3]):
            return _fail("x is not 4-D [B, H, T, hd] with a static head size", x)
        hd = xd[3]
        for axes, steps in ((a1, st1), (a2, st2)):
            if not _axes_equal(_ints(axes), 3, 4) or _ints(steps) != [1]:
                return _fail("slices are not unit-step slices of the last axis", axes, steps)
        first, second = (_ints(s1), _ints(e1)), (_ints(s2), _ints(e2))
        if first != ([0], [hd // 2]) or second[0] != [hd // 2] or second[1] is None or second[1][0] < hd:
            return _fail("x is not split into its two halves", s1, e1, s2, e2)
        self._freqs = self._computed_freqs(cos, sin)
        if self._freqs is not None:
            fd = _dims(self._freqs)
            if fd is None or len(fd) != 3 or not (_same(fd[0], xd[0]) and _same(fd[1], xd[2])) or fd[2] != hd // 2:
                return _fail("frequencies are not [B, T, hd/2]", self._freqs)
            return True
        tables = [_const(cos), _const(sin)]
        if any(t is None or t.ndim != 4 or t.shape[1] != 1 or t.shape[3] != hd for t in tables):
            return _fail("cos/sin are neither computed from frequencies nor [B, 1, T, hd] constants", cos, sin)
        fits = all(t.shape[0] in (1, xd[0]) and t.shape[2] == xd[2] for t in tables)
        if not (_static(xd[0]) and _static(xd[2]) and fits):
            return _fail("constant cos/sin do not match a static [B, T]", cos, sin)
        if any(not np.array_equal(t[..., : hd // 2], t[..., hd // 2:]) for t in tables):
            return _fail("constant cos/sin are not in the half-split layout", cos, sin)
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
            if unsq is None or unsq.op_type != "Unsqueeze" or _ints(unsq.inputs[1]) != [1]:
                return None
            trig = unsq.inputs[0].producer()
            if trig is not None and trig.op_type == "Cast":
                trig = trig.inputs[0].producer()
            if trig is None or trig.op_type != fn:
                return None
            cat = trig.inputs[0].producer()
            if cat is None or cat.op_type != "Concat" or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
                return None
            rank = len(_dims(cat.inputs[0]) or ())
            if rank == 0 or _attr(cat, "axis") % rank != rank - 1:
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
        return _named_after(op.RotaryEmbedding(x, cos, sin, interleaved=0), out)


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
        qd, vd, ktd = _dims(q), _dims(v), _dims(kt)
        if qd is None or vd is None or ktd is None or not (len(qd) == len(vd) == len(ktd) == 4):
            return _fail("q, v and K^T are not all 4-D", q, v, kt)
        B, H, _, D = qd
        if not (_static(H) and _static(D)):
            return _fail("heads and head size must be static", q)
        if not (_same(ktd[0], B) and ktd[1] == H and ktd[2] == D and _same(vd[0], B) and vd[1] == H):
            return _fail("K^T / V are not [B, H, hd, S] / [B, H, S, dv]", kt, v)
        S = ktd[3]
        if not _same(vd[2], S):
            return _fail("K and V sequence lengths differ", kt, v)
        kd = _dims(k_src)
        is_bhsd = kd is not None and len(kd) == 4 and _same(kd[0], B) and kd[1] == H and _same(kd[2], S) and kd[3] == D
        if k_layout == "4d" or is_bhsd:
            if not is_bhsd:
                return _fail("K is not [B, H, S, hd]", k_src)
            self._k_shape = None  # K is used as it is
        else:
            k3d = _dims(b["k3"])
            if k3d is None or len(k3d) != 3 or not (_same(k3d[1], S) and k3d[2] == D):
                return _fail("K is not flattened to [B*H, S, hd]", b["k3"])
            if kd is None or len(kd) < 3 or not (_same(kd[-2], S) and kd[-1] == D):
                return _fail("K source does not end in [S, hd]", k_src)
            lead = kd[:-2]
            if len(lead) >= 2 and _same(lead[0], B) and all(map(_static, lead[1:])) and math.prod(lead[1:]) == H:
                batch = B if _static(B) else 0  # Reshape's 0 copies K's own batch dim
            elif len(lead) == 1 and _static(lead[0]) and _static(B) and lead[0] == B * H:
                batch = B
            else:
                return _fail("K source does not flatten to [B*H, S, hd]", k_src)
            self._k_shape = [batch, H, S if _static(S) else -1, D]
        scale = 1.0
        for tagged, name in ((q_scaled, "q_scale"), (k_scaled, "k_scale")):
            if tagged:
                s = _scalar(b.get(name))
                if not isinstance(s, float):
                    return _fail(f"{name} is not a float constant", b.get(name))
                scale *= s
        self._scale = scale
        self._mask = None
        if masked:
            bias = b["bias"]
            mask = self._bool_mask(bias)
            self._mask = mask if mask is not None else bias
            md = _dims(self._mask)
            if md is None or len(md) != 4:
                return _fail("mask is not 4-D", self._mask)
            if mask is None and bias.dtype not in _FLOAT_TYPES:
                return _fail("bias is not float", bias)
        fill = b.get("nan_fill")
        if fill is not None and _scalar(fill) != 0:
            return _fail("NaN guard does not fill zeros", fill)
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
        if cond is None or cond.dtype != ir.DataType.BOOL or bias.dtype not in _FLOAT_TYPES:
            return None
        lowest = float(np.finfo(bias.dtype.numpy()).min) if bias.dtype != ir.DataType.BFLOAT16 else -3.3895e38
        neg_value = _scalar(neg)
        if _scalar(zero) != 0 or neg_value is None or not (neg_value == -math.inf or neg_value <= lowest):
            return None
        return cond

    def rewrite(self, op, q, k_src, v, out, **_):
        k = k_src if self._k_shape is None else op.Reshape(
            k_src, op.Constant(value=ir.tensor(np.array(self._k_shape, dtype=np.int64))))
        inputs = [q, k, v] + ([self._mask] if self._mask is not None else [])
        return _named_after(op.Attention(*inputs, scale=float(self._scale)), out)


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
        if _ints(ak) != [2] or _ints(av) != [2]:
            return _fail("K/V are not unsqueezed at axis 2", ak, av)
        qd, kd, vd = _dims(q), _dims(k), _dims(v)
        if qd is None or kd is None or vd is None or not (len(qd) == len(kd) == len(vd) == 4):
            return _fail("q, k, v are not 4-D", q, k, v)
        H, KV = qd[1], kd[1]
        if not (_static(H) and _static(KV)) or KV != vd[1] or H % KV:
            return _fail("query heads are not a multiple of the KV heads", q, k)
        rep = H // KV
        for src, expanded in ((k, k5), (v, v5)):
            sd, ed = _dims(src), _dims(expanded)
            want = (sd[0], KV, rep, sd[2], sd[3])
            if ed is None or len(ed) != 5 or not all(_compatible(a, w) for a, w in zip(ed, want)):
                return _fail("K/V are not expanded to [B, KV, H/KV, S, hd]", expanded)
        node = out.producer()
        if any(name in node.attributes for name in ("q_num_heads", "kv_num_heads")):
            return _fail("3-D head attributes on a 4-D Attention", out)
        return True

    def rewrite(self, op, q, k, v, out, mask=None, **_):
        attrs = dict(out.producer().attributes)
        inputs = [q, k, v] + ([mask] if mask is not None else [])
        return _named_after(op.Attention(*inputs, **attrs), out)


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
        pd, ud, ld = _dims(past), _dims(update), _dims(cache_len)
        if pd is None or ud is None or len(pd) != 4 or len(ud) != 4:
            return _fail("cache and update are not 4-D", past, update)
        if _attr(node, "axis", 0) % 4 != 2 or _attr(node, "reduction", "none") != "none":
            return _fail("not a plain scatter along axis 2", out)
        if ld is None or len(ld) != 1 or cache_len.dtype != ir.DataType.INT64 or not _same(ld[0], pd[0]):
            return _fail("cache_len is not int64 [B]", cache_len)
        if _ints(ax_l) not in ([1], [-1]) or _ints(ax_i) != [1, 3]:
            return _fail("index is not cache_len[:, None, :, None]", ax_l, ax_i)
        T = ud[2]
        if not _static(T) or _ints(arange) != list(range(T)):
            return _fail("offsets are not arange(T)", arange)
        if not all(_same(a, b) for i, (a, b) in enumerate(zip(pd, ud)) if i != 2):
            return _fail("cache and update differ outside the sequence axis", past, update)
        idx = _dims(index)
        if idx is None or not all(_same(a, b) for a, b in zip(idx, ud)):
            return _fail("index does not cover the update", index)
        return True

    def rewrite(self, op, past, update, cache_len, out, **_):
        return _named_after(op.TensorScatter(past, update, cache_len, axis=-2, mode="linear"), out)


def fuse_rms_norm(model: ir.Model) -> int:
    return _apply([RMSNormFusion.rule()], model)


def fuse_rotary(model: ir.Model) -> int:
    return _apply([RotaryFusion.rule()], model)


def fuse_attention(model: ir.Model) -> int:
    return _apply([AttentionFusion.rule()], model)


def fuse_attention_gqa(model: ir.Model) -> int:
    return _apply([AttentionGQAFusion.rule()], model, commute=False)


def kv_scatter_to_tensor_scatter(model: ir.Model) -> int:
    return _apply([KVScatterToTensorScatter.rule()], model)


# --------------------------------------------------------------------------------------------
# Target fix-ups
# --------------------------------------------------------------------------------------------

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
        return x.dtype in _INT_TYPES

    def rewrite(self, op, x, out, lo=None, hi=None, **_):
        y = x if lo is None else _named_after(op.Max(x, lo), out)
        return y if hi is None else _named_after(op.Min(y, hi), out)


def int_clip_to_min_max(model: ir.Model) -> int:
    return _apply([IntClipToMinMax.rule()], model, commute=False)


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


# --------------------------------------------------------------------------------------------
# Decompositions (targets without the opset-23/24 ops)
# --------------------------------------------------------------------------------------------

def _i64(op, values):
    return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))


def _f(op, value: float, dtype: ir.DataType):
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype.numpy())))


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
        qd, kd, vd = _dims(q), _dims(k), _dims(v)
        if qd is None or kd is None or vd is None or not (len(qd) == len(kd) == len(vd) == 4):
            return _fail("only 4-D Attention is decomposed", q)
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return _fail("present/qk outputs are used", out)
        if _attr(node, "is_causal", 0) or _attr(node, "softcap", 0.0) or _attr(node, "qk_matmul_output_mode", 0):
            return _fail("causal / softcap / qk-output attributes are not decomposed", out)
        for name in ("left_window_size", "right_window_size"):
            if _attr(node, name, -1) != -1:
                return _fail("sliding windows are not decomposed", out)
        H, KV = qd[1], kd[1]
        if not (_static(H) and _static(KV)) or H % KV or vd[1] != KV:
            return _fail("static heads with q_heads % kv_heads == 0 are needed", q, k)
        if KV != H and not (_static(kd[3]) and _static(vd[3])):
            return _fail("repeating KV heads needs static head sizes", k, v)
        if mask is not None and mask.dtype not in (ir.DataType.BOOL, *_FLOAT_TYPES):
            return _fail("mask is neither boolean nor float", mask)
        self._scale = _attr(node, "scale", None)
        if self._scale is None:
            if not _static(qd[3]):
                return _fail("head size must be static for the default scale", q)
            self._scale = 1.0 / math.sqrt(qd[3])
        return True

    def rewrite(self, op, q, k, v, out, mask=None, **_):
        dtype = q.dtype
        H, KV = _dims(q)[1], _dims(k)[1]

        def repeat(x):
            if KV == H:
                return x
            D = _dims(x)[3]
            shape5 = op.Concat(op.Shape(x, start=0, end=1), _i64(op, [KV, H // KV]),
                               op.Shape(x, start=2, end=4), axis=0)
            x5 = op.Expand(op.Unsqueeze(x, _i64(op, [2])), shape5)
            return op.Reshape(x5, _i64(op, [0, H, -1, D]))

        kt = op.Transpose(repeat(k), perm=[0, 1, 3, 2])
        scores = op.Mul(op.MatMul(q, kt), _f(op, self._scale, dtype))
        if mask is not None:
            bias = mask if mask.dtype != ir.DataType.BOOL else op.Where(
                mask, _f(op, 0.0, dtype), _f(op, -math.inf, dtype))
            scores = op.Add(scores, bias)
        probs = op.Softmax(scores, axis=-1)
        if mask is not None:
            probs = op.Where(op.IsNaN(probs), _f(op, 0.0, dtype), probs)
        return op.MatMul(probs, repeat(v))


class RMSNormDecomposition(pattern.RewriteRuleClassBase):
    """RMSNormalization  ->  Pow / ReduceMean / Add / Sqrt / Reciprocal / Mul (stash in float32)."""

    def __init__(self):
        super().__init__("RMSNormDecomposition", remove_nodes=False)

    def pattern(self, op, x, scale):
        return op.RMSNormalization(x, scale, _outputs=["out"])

    def check(self, context, x, out, **_):
        node = out.producer()
        rank = len(_dims(x) or ())
        if rank == 0:
            return _fail("input rank unknown", x)
        if _attr(node, "stash_type", 1) != int(ir.DataType.FLOAT) or x.dtype not in _FLOAT_TYPES:
            return _fail("only float32 stash is decomposed", out)
        self._axes = list(range(_attr(node, "axis", -1) % rank, rank))
        self._eps = float(_attr(node, "epsilon", 1e-5))
        return True

    def rewrite(self, op, x, scale, out, **_):
        xf = x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)
        ms = op.ReduceMean(op.Pow(xf, _f(op, 2.0, ir.DataType.FLOAT)), _i64(op, self._axes), keepdims=1)
        normed = op.Mul(xf, op.Reciprocal(op.Sqrt(op.Add(ms, _f(op, self._eps, ir.DataType.FLOAT)))))
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
        xd = _dims(x)
        if xd is None or len(xd) != 4 or not _static(xd[3]):
            return _fail("only 4-D x with a static head size is decomposed", x)
        if _attr(node, "interleaved", 0) or _attr(node, "rotary_embedding_dim", 0) not in (0, xd[3]):
            return _fail("interleaved / partial rotary is not decomposed", out)
        return True

    def rewrite(self, op, x, cos, sin, position_ids=None, **_):
        hd = _dims(x)[3]

        def table(t):  # [B, T, hd/2] -> [B, 1, T, hd]
            if position_ids is not None:
                t = op.Gather(t, position_ids, axis=0)
            return op.Unsqueeze(op.Concat(t, t, axis=-1), _i64(op, [1]))

        first = op.Slice(x, _i64(op, [0]), _i64(op, [hd // 2]), _i64(op, [3]), _i64(op, [1]))
        second = op.Slice(x, _i64(op, [hd // 2]), _i64(op, [hd]), _i64(op, [3]), _i64(op, [1]))
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
        ud = _dims(update)
        if ud is None or _attr(node, "mode", "linear") != "linear":
            return _fail("only linear mode with a known update rank is decomposed", out)
        axis = _attr(node, "axis", -2) % len(ud)
        if axis == 0 or not _static(ud[axis]):
            return _fail("the write axis must be static and not the batch axis", update)
        self._axis = axis
        return True

    def rewrite(self, op, past, update, write_indices, **_):
        ud = _dims(update)
        rank, axis, T = len(ud), self._axis, ud[self._axis]
        slots = op.Add(op.Unsqueeze(write_indices, _i64(op, [1])), _i64(op, list(range(T))))  # [B, T]
        other = [d for d in range(1, rank) if d != axis]
        index = op.Expand(op.Unsqueeze(slots, _i64(op, other)) if other else slots, op.Shape(update))
        return op.ScatterElements(past, index, update, axis=axis)


def decompose_attention(model: ir.Model) -> int:
    return _apply([AttentionDecomposition.rule()], model, commute=False)


def decompose_rms_norm(model: ir.Model) -> int:
    return _apply([RMSNormDecomposition.rule()], model, commute=False)


def decompose_rotary(model: ir.Model) -> int:
    return _apply([RotaryDecomposition.rule()], model, commute=False)


def decompose_tensor_scatter(model: ir.Model) -> int:
    return _apply([TensorScatterDecomposition.rule()], model, commute=False)
