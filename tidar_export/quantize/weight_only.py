"""Weight-only int4 / int8: block-wise quantization along the input dimension, lowered per target
(`ort`: com.microsoft MatMulNBits / GatherBlockQuantized; TensorRT: block-quantized INT4
DequantizeLinear, opset 21+).

Two grids. "minmax" (the default on ort): each block's own [min, max] in 2**bits levels, so a
block that holds at most 2**bits evenly spaced values is kept exactly -- a checkpoint dequantized
from GGUF Q4_1/Q4_0 blocks of 32 re-quantizes without error. w = min + code * scale is computed as
MatMulNBits on the codes with its default zero point (w' = (code - 2**(bits-1)) * scale) plus a
per-block offset c = min + 2**(bits-1) * scale: x @ W = x @ W' + blocksum(x) @ C, with C
[K / block, N] a small float matrix. (MatMulNBits' own float zero-point input gives the same
numbers, but ONNX Runtime 1.32's CPU kernel runs it about 8x slower than without, slower than
fp32: measured 4.1 vs 0.5 ms for a 576 x 1536 weight, one thread.) "rtn" / "awq": symmetric levels
around 0 (zero point fixed), which TensorRT's INT4 weights require.
"""

from __future__ import annotations

import numpy as np

from tidar_export.quantize.graph import (
    drop_unused, initializer_array, insert_before, linear_layers, replace_initializer, table_use, tensor_proto,
)


WEIGHT_ONLY_BITS = {"int4": 4, "int8-wo": 8}
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
WO_METHODS = ("minmax", "awq", "rtn")
AWQ_ALPHAS = tuple(i / 10 for i in range(11))  # alpha 0 is RTN: the search never does worse on its sample
BLOCK_DQ_MIN_OPSET = 21  # DequantizeLinear's block_size attribute and the INT4 type


def block_quantize(wt: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantization of `wt` [N, K] along K (blocks of `block`, the last one
    zero-padded): integer codes [N, ceil(K / block) * block] in [-qmax, qmax] and scales
    [N, ceil(K / block)] (float32), qmax = 2**(bits-1) - 1."""
    n, k = wt.shape
    kb = -(-k // block)
    padded = np.zeros((n, kb * block), np.float32)
    padded[:, :k] = wt
    blocks = padded.reshape(n, kb, block)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(blocks).max(-1)
    scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / scales[..., None]), -qmax, qmax).astype(np.int8)
    return codes.reshape(n, kb * block), scales


def block_quantize_minmax(wt: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric block quantization of `wt` [N, K] along K (the last block padded with its last
    value): unsigned codes [N, ceil(K / block) * block] in [0, 2**bits - 1], scales and float zero
    points [N, ceil(K / block)]; the weight is (code - zero point) * scale = min + code * scale."""
    n, k = wt.shape
    kb = -(-k // block)
    blocks = np.pad(wt.astype(np.float32), ((0, 0), (0, kb * block - k)), mode="edge").reshape(n, kb, block)
    levels = 2 ** bits - 1
    lo, hi = blocks.min(-1), blocks.max(-1)
    scales = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32)
    codes = np.clip(np.rint((blocks - lo[..., None]) / scales[..., None]), 0, levels).astype(np.uint8)
    return codes.reshape(n, kb * block), scales, (-lo / scales).astype(np.float32)


def block_dequantize(codes: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    n, kp = codes.shape
    block = kp // scales.shape[1]
    return (codes.reshape(n, -1, block).astype(np.float32) * scales[..., None]).reshape(n, kp)[:, :k]


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, Kp] -> unsigned, packed low nibble first (bits 4) as MatMulNBits/GatherBlockQuantized
    read them: signed codes get their default zero point 2**(bits-1), unsigned ones stay."""
    u = codes if codes.dtype == np.uint8 else (codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    return u if bits == 8 else (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def unshare_weights(model) -> int:
    """Give every extra MatMul / RMSNormalization / bias Add that reads the same weight
    initializer a copy of its own (named `{weight}@{node}`), so that folding an AWQ scale into
    one layer's weight or bias leaves the others alone. The exporter merges identical
    initializers: every RMSNorm weight (all ones) and every bias (zeros) of a fresh model becomes
    one tensor read by all of them. Node names are the same in the three graphs, so each graph
    gets the same names. Returns the copies made."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list] = {}  # initializer -> [(node, input index)]
    for n in model.graph.node:
        slots = [1] if n.op_type in ("MatMul", "RMSNormalization") else [0, 1] if n.op_type == "Add" else []
        for i in slots:
            if i < len(n.input) and n.input[i] in inits and (n.op_type != "Add" or len(inits[n.input[i]].dims) == 1):
                readers.setdefault(n.input[i], []).append((n, i))
    copies = 0
    for name, uses in readers.items():
        for n, i in sorted(uses, key=lambda u: u[0].name)[1:]:
            twin = TensorProto()
            twin.CopyFrom(inits[name])
            twin.name = f"{name}@{n.name}"
            model.graph.initializer.append(twin)
            n.input[i] = twin.name
            copies += 1
    return copies


def weight_only_graph(model, precision: str, block: int, target: str, tables: bool, accuracy_level: int,
                      overrides: dict[str, np.ndarray], minmax: bool = False, table_bits: int | None = None) -> dict:
    """Weight-only block quantization of every linear layer (and, with `tables`, of the embedding
    table and the LM head, in `table_bits`, default the precision's), lowered for `target`: `ort` ->
    com.microsoft MatMulNBits (and GatherBlockQuantized for the embedding); TensorRT targets ->
    block-quantized INT4 DequantizeLinear (opset 21+) on the weights, feeding the MatMul / Gather.
    minmax: the linear layers on the asymmetric grid (module doc; ort only)."""
    from onnx import helper

    bits = WEIGHT_ONLY_BITS[precision]
    table_bits = table_bits or bits
    for name, array in overrides.items():
        replace_initializer(model, name, array)
    linears = linear_layers(model)
    by_name = {n.name: n for n in model.graph.node}
    plan: dict[str, list] = {}
    new_inits, made = [], set()
    ort_target = target == "ort"
    if ort_target and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    def matmul_nbits(node, w_kn: np.ndarray, key: str, bits: int = bits, asym: bool = False):
        k, n = w_kn.shape
        asym = asym and k % block == 0  # the offset term sums whole blocks of the input
        b, sn, cn = f"{key}_nbits", f"{key}_nbits_scale", f"{key}_nbits_block_offset"
        if asym:
            codes, scales, zero_points = block_quantize_minmax(w_kn.T, bits, block)
            offsets = (2 ** (bits - 1) - zero_points) * scales  # c = min + 2**(bits-1) * scale, [N, K / block]
        else:
            codes, scales = block_quantize(w_kn.T, bits, block)
        if b not in made:
            new_inits.extend([tensor_proto(b, _pack(codes, bits).reshape(n, -1, block * bits // 8)),
                              tensor_proto(sn, scales.astype(w_kn.dtype))])
            if asym:
                new_inits.extend([tensor_proto(cn, offsets.T.astype(w_kn.dtype)),
                                  tensor_proto(f"{cn}_shape", np.array([0, 0, k // block, block], np.int64))])
            made.add(b)
        out, x = node.output[0], node.input[0]
        nbits = helper.make_node("MatMulNBits", [x, b, sn], [f"{out}_grid" if asym else out], name=node.name,
                                 domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                                 accuracy_level=accuracy_level)
        if not asym:
            node.CopyFrom(nbits)
            return
        scope = node.name.rsplit("/", 1)[0]  # the module path: compare localizes by it
        add = helper.make_node("Add", [f"{out}_grid", f"{out}_offset"], [out], name=f"{scope}/BlockOffset/Add")
        plan[add.name] = [nbits,
                          helper.make_node("Reshape", [x, f"{cn}_shape"], [f"{out}_blocks"], name=f"{scope}/BlockOffset/Reshape"),
                          helper.make_node("ReduceSum", [f"{out}_blocks", "block_sum_axes"], [f"{out}_block_sums"],
                                           keepdims=0, name=f"{scope}/BlockOffset/ReduceSum"),
                          helper.make_node("MatMul", [f"{out}_block_sums", cn], [f"{out}_offset"],
                                           name=f"{scope}/BlockOffset/MatMul")]
        if "block_sum_axes" not in made:
            new_inits.append(tensor_proto("block_sum_axes", np.array([-1], np.int64)))
            made.add("block_sum_axes")
        node.CopyFrom(add)

    def block_dq(consumer: str, w: np.ndarray, axis: int, key: str) -> str:
        """DequantizeLinear(int4 codes of w, block scales) along `axis` (the reduction axis)."""
        wk = w if axis == 1 else w.T  # [rows, K]
        codes, scales = block_quantize(wk, bits, block)
        codes = codes[:, : wk.shape[1]]
        qn, sn, out = f"{key}_quantized", f"{key}_scale", f"{key}_dequantized"
        if qn not in made:
            import ml_dtypes

            c = codes if axis == 1 else codes.T
            s = scales if axis == 1 else scales.T
            new_inits.extend([tensor_proto(qn, c.astype(ml_dtypes.int4)), tensor_proto(sn, s.astype(w.dtype))])
            made.add(qn)
            plan.setdefault(consumer, []).append(
                helper.make_node("DequantizeLinear", [qn, sn], [out], axis=axis, block_size=block,
                                 name=f"{key}_DequantizeLinear"))
        return out

    for lin in linears:
        w = initializer_array(model, lin.weight)
        node = by_name[lin.node]
        if ort_target:
            matmul_nbits(node, w, lin.weight, asym=minmax)
        else:
            node.input[1] = block_dq(lin.node, w, 0, lin.weight)
    done = {"nodes": len(linears), "tables": []}
    use = table_use(model)
    if tables:
        if use.head is not None and (use.head_weight or use.head_table):
            w_kn = initializer_array(model, use.head_weight) if use.head_weight else initializer_array(model, use.head_table).T
            key = use.head_weight or f"{use.head_table}.T"
            if ort_target:
                matmul_nbits(use.head, np.ascontiguousarray(w_kn), key, bits=table_bits)
            else:
                use.head.input[1] = block_dq(use.head.name, np.ascontiguousarray(w_kn), 0, key)
            done["tables"].append("lm_head")
        # The embedding lookup: MatMulNBits' sibling GatherBlockQuantized on ort. TensorRT documents
        # INT4 weights for the GEMM path (the DequantizeLinear before a MatMul), not for a Gather,
        # and nothing here can check that its parser takes one: the table stays float there.
        if use.gather is not None and ort_target:
            table = initializer_array(model, use.table)
            v, k = table.shape
            codes, scales = block_quantize(table, table_bits, block)
            d, sn = f"{use.table}_gbq", f"{use.table}_gbq_scale"
            new_inits.extend([tensor_proto(d, _pack(codes, table_bits)[:, : k * table_bits // 8].copy()),
                              tensor_proto(sn, scales.astype(table.dtype))])
            use.gather.CopyFrom(helper.make_node(
                "GatherBlockQuantized", [d, use.gather.input[1], sn], list(use.gather.output), name=use.gather.name,
                domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block, bits=table_bits))
            done["tables"].append("embedding")
    model.graph.initializer.extend(new_inits)
    insert_before(model, plan)
    drop_unused(model)
    return done


def externalize_packed(weights, model) -> None:
    """Move the 4-bit initializers into weights.bin as the packed bytes ONNX stores (the generic
    `externalize_proto` writes numpy's one-byte-per-element view of them)."""
    import onnx

    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and t.raw_data:
            weights.point_at(t, *weights.add(t.data_type, tuple(t.dims), np.frombuffer(t.raw_data, np.uint8)))
