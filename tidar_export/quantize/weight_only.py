"""Weight-only int4 / int8: block-wise symmetric quantization along the input dimension, lowered per
target (`ort`: com.microsoft MatMulNBits / GatherBlockQuantized; TensorRT: block-quantized INT4
DequantizeLinear, opset 21+).
"""

from __future__ import annotations


import numpy as np

from tidar_export.quantize.graph import (
    drop_unused, initializer_array, insert_before, linear_layers, replace_initializer, table_use, tensor_proto,
)


WEIGHT_ONLY_BITS = {"int4": 4, "int8-wo": 8}
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
WO_METHODS = ("awq", "rtn")
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


def block_dequantize(codes: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    n, kp = codes.shape
    block = kp // scales.shape[1]
    return (codes.reshape(n, -1, block).astype(np.float32) * scales[..., None]).reshape(n, kp)[:, :k]


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, Kp] -> unsigned, packed low nibble first (bits 4) as MatMulNBits/GatherBlockQuantized
    read them (zero point 2**(bits-1), their default)."""
    u = (codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
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
                      overrides: dict[str, np.ndarray]) -> dict:
    """Weight-only block quantization of every linear layer (and, with `tables`, of the embedding
    table and the LM head), lowered for `target`: `ort` -> com.microsoft MatMulNBits (and
    GatherBlockQuantized for the embedding); TensorRT targets -> block-quantized INT4
    DequantizeLinear (opset 21+) on the weights, feeding the MatMul / Gather."""
    from onnx import helper

    bits = WEIGHT_ONLY_BITS[precision]
    for name, array in overrides.items():
        replace_initializer(model, name, array)
    linears = linear_layers(model)
    by_name = {n.name: n for n in model.graph.node}
    plan: dict[str, list] = {}
    new_inits, made = [], set()
    ort_target = target == "ort"
    if ort_target and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    def matmul_nbits(node, w_kn: np.ndarray, key: str):
        k, n = w_kn.shape
        codes, scales = block_quantize(w_kn.T, bits, block)
        b, sn = f"{key}_nbits", f"{key}_nbits_scale"
        if b not in made:
            new_inits.extend([tensor_proto(b, _pack(codes, bits).reshape(n, -1, block * bits // 8)),
                              tensor_proto(sn, scales.astype(w_kn.dtype))])
            made.add(b)
        new = helper.make_node("MatMulNBits", [node.input[0], b, sn], list(node.output), name=node.name,
                               domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                               accuracy_level=accuracy_level)
        node.CopyFrom(new)

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
            matmul_nbits(node, w, lin.weight)
        else:
            node.input[1] = block_dq(lin.node, w, 0, lin.weight)
    done = {"nodes": len(linears), "tables": []}
    use = table_use(model)
    if tables:
        if use.head is not None and (use.head_weight or use.head_table):
            w_kn = initializer_array(model, use.head_weight) if use.head_weight else initializer_array(model, use.head_table).T
            key = use.head_weight or f"{use.head_table}.T"
            if ort_target:
                matmul_nbits(use.head, np.ascontiguousarray(w_kn), key)
            else:
                use.head.input[1] = block_dq(use.head.name, np.ascontiguousarray(w_kn), 0, key)
            done["tables"].append("lm_head")
        # The embedding lookup: MatMulNBits' sibling GatherBlockQuantized on ort. TensorRT documents
        # INT4 weights for the GEMM path (the DequantizeLinear before a MatMul), not for a Gather,
        # and nothing here can check that its parser takes one: the table stays float there.
        if use.gather is not None and ort_target:
            table = initializer_array(model, use.table)
            v, k = table.shape
            codes, scales = block_quantize(table, bits, block)
            d, sn = f"{use.table}_gbq", f"{use.table}_gbq_scale"
            new_inits.extend([tensor_proto(d, _pack(codes, bits)[:, : k * bits // 8].copy()),
                              tensor_proto(sn, scales.astype(table.dtype))])
            use.gather.CopyFrom(helper.make_node(
                "GatherBlockQuantized", [d, use.gather.input[1], sn], list(use.gather.output), name=use.gather.name,
                domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block, bits=bits))
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
