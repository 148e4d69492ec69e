"""ONNX Runtime contrib-op rewrites for the `ort` target (domain com.microsoft).

`ar_step_group_query_attention`: the AR step graph's attention as ONNX Runtime's
GroupQueryAttention over a cache buffer it shares with its output (past_present_share_buffer).

Why only the AR step. GroupQueryAttention always applies a causal mask over the new tokens,
so it cannot express the TiDAR step or prefill masks (mask slots see their whole block), but
the AR step's mask is exactly causal: one new token per row at slot L, seeing slots 0..L. What
it buys, measured on the demo model (ORT 1.32 CPU, one thread, docs/GRAPHS.md): the rotary
embedding moves into the attention kernel, the new K/V are written into the cache in place
(no cache-sized Concat per layer and step), attention reads only each row's L + 1 used slots
(not all max_seq_len), and the Transposes/Reshapes around it go. With fused projections
(`fusions.fuse_projections`) and no qk-norm, it reads the packed q/k/v MatMul output directly.

The rewrite changes the graph's cache contract: its present.* outputs become the whole cache
[B, KV, max_seq_len, hd], and a runtime must bind them to the same buffers as the
past_key_values.* inputs (GroupQueryAttention detects the shared buffer by address and then
writes only slot L of each row). The tracer traces the AR step of this target with the
in-graph cache write (kv_update="inplace"; this pass first makes it a TensorScatter with
`fusions.kv_scatter_to_tensor_scatter`) and the manifest records `kv_update: "inplace"` for it; this pass turns that form into
GroupQueryAttention. The target table runs it on the AR step only (`Target.ar_step_gqa`, the
AR step's form when the export asks for it), and it raises if an attention of that graph does
not have the expected form, since a TensorScatter left in an opset-23 graph would not be valid ONNX.

Numerics: cos/sin become tables over positions 0..max_seq_len-1 computed here in float32 from
the graph's inverse frequencies (the graph computed cos(L * inv_freq) in float32 on the fly);
GroupQueryAttention computes softmax in float32. tests/test_graphs.py compares the rewritten
graph with torch within the fp32 tolerances.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tidar_graphs import fusions
from tidar_graphs._match import attr, const, dims, ints
from tidar_runtime.contract import CACHE_LEN
from tidar_runtime.errors import TiDARError

MS_DOMAIN = "com.microsoft"
# ONNX Runtime's GroupQueryAttention refuses other head sizes ("head_size shall be a multiple of
# 16", ORT 1.32); the export keeps the step's Attention op for such models (Target.ar_step_fits).
GQA_HEAD_SIZE_MULTIPLE = 16


def group_query_attention_fits(head_dim: int) -> bool:
    return head_dim > 0 and head_dim % GQA_HEAD_SIZE_MULTIPLE == 0


class _NoMatch(Exception):
    pass


def _producer(value: ir.Value | None, op_type: str) -> ir.Node:
    node = None if value is None else value.producer()
    if node is None or node.op_type != op_type:
        got = "a graph input or constant" if node is None else node.op_type
        raise _NoMatch(f"{getattr(value, 'name', None)!r} is produced by {got}, expected {op_type}")
    return node


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node:
    users = value.consumers()
    if len(users) != 1 or users[0].op_type != op_type or value.is_graph_output():
        raise _NoMatch(f"{value.name!r} is not read by exactly one {op_type}")
    return users[0]


def _heads_first(value: ir.Value) -> ir.Value:
    """x4 [B, T, N, hd] when value = Transpose(x4, perm=[0, 2, 1, 3])."""
    node = _producer(value, "Transpose")
    if list(attr(node, "perm") or ()) != [0, 2, 1, 3]:
        raise _NoMatch(f"{value.name!r}: Transpose perm is {attr(node, 'perm')}, not [0, 2, 1, 3]")
    return node.inputs[0]


def _rotary(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(x4 [B, T, N, hd], cos, sin) when value = RotaryEmbedding(Transpose(x4), cos, sin), half-split."""
    node = _producer(value, "RotaryEmbedding")
    if attr(node, "interleaved", 0) != 0 or len(node.inputs) != 3 or attr(node, "rotary_embedding_dim", 0) != 0:
        raise _NoMatch(f"{value.name!r}: not a plain half-split RotaryEmbedding(x, cos, sin)")
    return _heads_first(node.inputs[0]), node.inputs[1], node.inputs[2]


def _scatter(value: ir.Value, cache_len: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(past, update) when value = TensorScatter(past, update, cache_len), the graph output present.*."""
    node = _producer(value, "TensorScatter")
    if node.inputs[2] is not cache_len or attr(node, "mode", "linear") != "linear" or attr(node, "axis", -2) % 4 != 2:
        raise _NoMatch(f"{value.name!r}: not TensorScatter(past, new, cache_len, axis=-2, mode='linear')")
    past = node.inputs[0]
    if not past.is_graph_input() or not value.is_graph_output():
        raise _NoMatch(f"{value.name!r}: the scattered cache is not graph input -> graph output")
    return past, node.inputs[1]


def _angles(cos: ir.Value, sin: ir.Value) -> ir.Value:
    """The angles f when cos = [Cast](Cos(f)) and sin = [Cast](Sin(f))."""
    found = []
    for value, fn in ((cos, "Cos"), (sin, "Sin")):
        node = value.producer()
        if node is not None and node.op_type == "Cast":
            value = node.inputs[0]
        found.append(_producer(value, fn).inputs[0])
    if found[0] is not found[1]:
        raise _NoMatch("cos and sin are not of the same angles")
    return found[0]


def _inverse_frequencies(angles: ir.Value, cache_len: ir.Value) -> np.ndarray:
    """inv_freq [hd/2] when angles = Unsqueeze(Cast(Unsqueeze(cache_len) + 0), -1) * inv_freq:
    the rotary angles of the one new token, at position L = cache_len."""
    mul = _producer(angles, "Mul")
    a, b = mul.inputs
    if const(a) is not None:
        a, b = b, a
    inv_freq = const(b)
    if inv_freq is None:
        raise _NoMatch("the rotary frequencies are not a constant")
    pos = _producer(_producer(a, "Unsqueeze").inputs[0], "Cast").inputs[0]
    add = _producer(pos, "Add")
    x, offset = add.inputs
    if const(x) is not None:
        x, offset = offset, x
    off = const(offset)
    if off is None or off.size != 1 or off.reshape(()).item() != 0:
        raise _NoMatch("the rotary positions are not cache_len + 0")
    unsq = _producer(x, "Unsqueeze")
    if unsq.inputs[0] is not cache_len or ints(unsq.inputs[1]) not in ([1], [-1]):
        raise _NoMatch("the rotary positions are not cache_len[:, None]")
    return np.asarray(inv_freq, dtype=np.float32).reshape(-1)


def _flat(value: ir.Value, block: list[ir.Node]) -> ir.Value:
    """[B, T, N * hd] from x4 [B, T, N, hd]: the Reshape's input when x4 is a Reshape of a 3-D
    tensor, else a new Reshape (the qk-norm models normalize per head before the rotation)."""
    node = value.producer()
    if node is not None and node.op_type == "Reshape":
        src = node.inputs[0]
        d, s = dims(src), dims(value)
        if d is not None and s is not None and len(d) == 3 and isinstance(d[2], int) and d[2] == s[2] * s[3]:
            return src
    shape = ir.Value(name=f"{value.name}_flat_shape", const_value=ir.tensor(np.array([0, 0, -1], np.int64)))
    reshape = ir.Node("", "Reshape", [value, _const(shape, block)], name=f"{value.name}_flat")
    block.append(reshape)
    return reshape.outputs[0]


def _packed(q3: ir.Value, k3: ir.Value, v3: ir.Value) -> ir.Value | None:
    """The packed [B, T, (H + 2 KV) * hd] tensor when q3, k3, v3 are the three outputs, in order,
    of one Split along its last axis (`fusions.fuse_projections`): GroupQueryAttention takes it
    as its query, with key and value empty, and skips the Split. None otherwise (qk-norm models
    normalize q and k per head after the Split)."""
    split = q3.producer()
    outs = list(split.outputs) if split is not None and split.op_type == "Split" else []
    if len(outs) != 3 or not all(a is b for a, b in zip(outs, (q3, k3, v3))):
        return None
    src = split.inputs[0]
    d = dims(src)
    if d is None or len(d) != 3 or attr(split, "axis", 0) % 3 != 2:
        return None
    return src


def _const(value: ir.Value, block: list[ir.Node]) -> ir.Value:
    node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", value.const_value)])
    block.append(node)
    return node.outputs[0]


def ar_step_group_query_attention(model: ir.Model) -> int:
    """Every attention of an AR step graph (scatter layout) as GroupQueryAttention over the shared
    cache (module doc); 0 for a graph without the in-graph cache write. Raises TiDARError naming the
    node and the reason when an attention does not have the expected form."""
    g = model.graph
    cache_len = next((v for v in g.inputs if v.name == CACHE_LEN), None)
    # the traced ScatterElements cache write, as TensorScatter; none: an AR step that returns the
    # new K/V ("slice"), which this pass leaves alone
    if cache_len is None or not fusions.kv_scatter_to_tensor_scatter(model):
        return 0
    attentions = [n for n in g if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    lengths: list[ir.Value] = []  # seqlens_k, total_sequence_length: made once, before the first layer
    tables: dict = {}
    for node in attentions:
        try:
            _rewrite(g, node, cache_len, lengths, tables)
        except _NoMatch as e:
            raise TiDARError(f"ar_step: cannot lower {node.name or node.op_type} to GroupQueryAttention: {e}") from None
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    return len(attentions)


def _rewrite(g: ir.Graph, node: ir.Node, cache_len: ir.Value, lengths: list, tables: dict) -> None:
    if len(node.inputs) != 4 or any(k not in ("scale",) for k in node.attributes):
        raise _NoMatch(f"attributes {sorted(node.attributes)} or {len(node.inputs)} inputs (want Q, K, V, mask; scale)")
    q_rot, k_all, v_all, _mask = node.inputs  # the mask is causal by construction (one new token, at L)
    q4, cos, sin = _rotary(q_rot)
    past_k, k_rot = _scatter(k_all, cache_len)
    past_v, v_new = _scatter(v_all, cache_len)
    k4, k_cos, k_sin = _rotary(k_rot)
    angles = _angles(cos, sin)
    if _angles(k_cos, k_sin) is not angles:
        raise _NoMatch("q and k are rotated with different angles")
    v4 = _heads_first(v_new)
    qd, kd, pd = dims(q4), dims(k4), dims(past_k)
    if qd is None or kd is None or pd is None or qd[1] != 1 or not all(isinstance(d, int) for d in (*qd[2:], *kd[2:], pd[2])):
        raise _NoMatch("not one new token with static head counts and cache length")
    heads, kv_heads, hd, slots = qd[2], kd[2], qd[3], pd[2]
    out_t = _only_consumer(node.outputs[0], "Transpose")
    if list(attr(out_t, "perm") or ()) != [0, 2, 1, 3]:
        raise _NoMatch("the attention output is not transposed back to [B, T, H, hd]")
    out_flat = _only_consumer(out_t.outputs[0], "Reshape")
    od = dims(out_flat.outputs[0])
    if od is None or len(od) != 3 or od[2] != heads * hd:
        raise _NoMatch("the attention output is not reshaped to [B, T, H * hd]")

    block: list[ir.Node] = []
    if not lengths:
        seqlens = ir.Node("", "Cast", [cache_len], attributes=[ir.AttrInt64("to", ir.DataType.INT32)], name="/gqa/seqlens_k")
        longest = ir.Node("", "ReduceMax", [seqlens.outputs[0]], attributes=[ir.AttrInt64("keepdims", 0)], name="/gqa/ReduceMax")
        one = ir.Value(name="gqa_one", const_value=ir.tensor(np.array(1, np.int32)))
        total = ir.Node("", "Add", [longest.outputs[0], _const(one, block)], name="/gqa/total_sequence_length")
        block += [seqlens, longest, total]
        lengths += [seqlens.outputs[0], total.outputs[0]]
    key = id(angles)
    if key not in tables:
        inv_freq = _inverse_frequencies(angles, cache_len)
        if inv_freq.size != hd // 2:
            raise _NoMatch(f"{inv_freq.size} rotary frequencies for head size {hd}")
        table_angles = np.arange(slots, dtype=np.float32)[:, None] * inv_freq[None, :]  # [max_seq_len, hd/2]
        dtype = q4.dtype.numpy() if q4.dtype is not None else np.float32
        tables[key] = [_const(ir.Value(name=f"gqa_{fn.__name__}_cache",
                                       const_value=ir.tensor(fn(table_angles).astype(np.float32).astype(dtype))), block)
                       for fn in (np.cos, np.sin)]
    q3, k3, v3 = (_flat(x, block) for x in (q4, k4, v4))
    packed = _packed(q3, k3, v3)
    scale = attr(node, "scale", None)
    attrs = [ir.AttrInt64("num_heads", heads), ir.AttrInt64("kv_num_heads", kv_heads),
             ir.AttrInt64("do_rotary", 1), ir.AttrInt64("rotary_interleaved", 0)]
    if scale is not None:
        attrs.append(ir.AttrFloat32("scale", float(scale)))
    scope = node.name.rsplit("/", 1)[0] if node.name and "/" in node.name else ""
    qkv = [packed, None, None] if packed is not None else [q3, k3, v3]
    gqa = ir.Node(MS_DOMAIN, "GroupQueryAttention", [*qkv, past_k, past_v, *lengths, *tables[key]],
                  attributes=attrs, num_outputs=3, name=f"{scope}/GroupQueryAttention")
    block.append(gqa)
    out, present_k, present_v = gqa.outputs
    out.dtype, out.shape = out_flat.outputs[0].dtype, out_flat.outputs[0].shape
    g.insert_before(node, block)
    out_flat.outputs[0].replace_all_uses_with(out)
    for old, new in ((k_all, present_k), (v_all, present_v)):
        new.dtype, new.shape = old.dtype, old.shape
        index = list(g.outputs).index(old)
        name = old.name
        old.name = f"{name}_scattered"
        new.name = name
        g.outputs[index] = new


def _free_axis(value: ir.Value, axis: int, name: str) -> None:
    """The traced static length of `axis` no longer holds (it follows max(cache_len) now)."""
    if value.shape is not None:
        d = list(value.shape)
        d[axis] = ir.SymbolicDim(name)
        value.shape = ir.Shape(d)


def attend_used_cache(model: ir.Model) -> int:
    """Attention over the used slots of a "slice" graph's cache, not all max_seq_len of them.

    The step graphs attend over [cache | new] (Concat of the past_key_values input and the new
    K/V, and the mask Concat(cache part [.., S], in-step part [.., T])). Every row's committed
    slots are 0..L-1, so slicing the cache and the mask's cache part to max(cache_len) slots
    changes no attention weight (slots at or past a row's L stay masked) and makes the cost of
    the Concat and of the attention follow the longest row instead of the cache size.
    """
    g = model.graph
    cache_len = next((v for v in g.inputs if v.name == CACHE_LEN), None)
    if cache_len is None:
        return 0
    used: list[ir.Value] = []
    sliced: set[int] = set()  # id() of the mask Concats whose cache part is cut already (one per graph)
    count = 0
    for node in [n for n in g if n.op_type == "Attention" and n.domain in ("", "ai.onnx") and len(n.inputs) == 4]:
        k_cat, v_cat, mask_cat = (x.producer() for x in node.inputs[1:4])
        if any(c is None or c.op_type != "Concat" or len(c.inputs) != 2 for c in (k_cat, v_cat, mask_cat)):
            continue
        pasts = [k_cat.inputs[0], v_cat.inputs[0]]
        if not all(p.is_graph_input() for p in pasts) or attr(k_cat, "axis") % 4 != 2 or attr(v_cat, "axis") % 4 != 2:
            continue
        cache_part, pd = mask_cat.inputs[0], dims(pasts[0])
        if id(mask_cat) not in sliced:  # the mask is one Concat shared by every layer: checked and cut once
            cd = dims(cache_part)
            if cd is None or pd is None or len(cd) != 4 or attr(mask_cat, "axis") % 4 != 3 or cd[3] != pd[2]:
                continue
        block: list[ir.Node] = []
        if not used:
            longest = ir.Node("", "ReduceMax", [cache_len], attributes=[ir.AttrInt64("keepdims", 1)],
                              name="/used_cache/ReduceMax")
            block.append(longest)
            zero = _const(ir.Value(name="used_cache_start", const_value=ir.tensor(np.array([0], np.int64))), block)
            two = _const(ir.Value(name="used_cache_axis2", const_value=ir.tensor(np.array([2], np.int64))), block)
            three = _const(ir.Value(name="used_cache_axis3", const_value=ir.tensor(np.array([3], np.int64))), block)
            used += [longest.outputs[0], zero, two, three]
        end, zero, two, three = used
        for cat, past in ((k_cat, pasts[0]), (v_cat, pasts[1])):
            cut = ir.Node("", "Slice", [past, zero, end, two], name=f"{past.name}/used")
            block.append(cut)
            cut.outputs[0].dtype = past.dtype
            cat.replace_input_with(0, cut.outputs[0])
            _free_axis(cat.outputs[0], 2, "used_len")
        if id(mask_cat) not in sliced:
            cut = ir.Node("", "Slice", [cache_part, zero, end, three], name="/used_cache/mask")
            block.append(cut)
            cut.outputs[0].dtype = cache_part.dtype
            sliced.add(id(mask_cat))
            g.insert_before(mask_cat, block)
            mask_cat.replace_input_with(0, cut.outputs[0])
            _free_axis(mask_cat.outputs[0], 3, "used_len")
        else:
            g.insert_before(k_cat, block)
        count += 1
    if count:
        g.sort()  # the first layer's slices may sit after a Concat that now reads them
    return count
