"""int8 / fp8 (E4M3): explicit Q/DQ on both inputs of every linear layer's MatMul, weights per output
channel and activations per tensor role, symmetric (zero point 0, TensorRT's requirement).
"""

from __future__ import annotations

import numpy as np

from tidar_export.errors import TiDARError
from tidar_export.quantize.graph import (
    activation_roles, drop_unused, initializer_array, insert_before, linear_layers, tensor_proto,
)
from tidar_export.quantize.stats import ActStats

INT8_METHODS = ("minmax", "percentile")  # activation range calibration for int8 / fp8
DEFAULT_INT8_METHOD = "minmax"  # equal to percentile within noise on the demo model, and cheaper (docs/QUANTIZATION.md)
DEFAULT_PERCENTILE = 99.999
FP8_MIN_OPSET = 19  # DequantizeLinear takes float8 inputs from opset 19 on


QMAX = {"int8": 127.0, "fp8": 448.0}  # symmetric ranges: int8 [-127, 127]; E4M3FN's largest finite value


def _to_qtype(x: np.ndarray, precision: str) -> np.ndarray:
    if precision == "int8":
        return np.clip(np.rint(x), -127, 127).astype(np.int8)
    import ml_dtypes

    return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)  # round to nearest even


def _zeros(shape, precision: str) -> np.ndarray:
    import ml_dtypes

    return np.zeros(shape, np.int8 if precision == "int8" else ml_dtypes.float8_e4m3fn)


def activation_scales(stats: dict[str, ActStats], precision: str, method: str, percentile: float) -> dict[str, float]:
    """One scale per activation role (symmetric, per tensor), shared by every graph."""
    out = {}
    for role, s in stats.items():
        amax = s.percentile_amax(percentile) if method == "percentile" else s.amax
        out[role] = float(np.float32(amax / QMAX[precision])) if amax > 0 else 1.0  # as the graphs store it
    return out


def qdq_graph(model, scales: dict[str, float], precision: str) -> int:
    """Q/DQ on both inputs of every linear layer: activations per tensor with the shared scale of
    their role, weights per output channel (symmetric, zero point 0). Returns the MatMuls done."""
    from onnx import helper

    linears = linear_layers(model)
    roles = activation_roles(linears)
    missing = sorted({roles[lin.act] for lin in linears} - set(scales))
    if missing:
        raise TiDARError(f"no calibrated activation range for {missing[0]} (it saw no calibration input)")
    plan: dict[str, list] = {}
    done_acts: dict[str, str] = {}
    new_inits = []
    by_name = {n.name: n for n in model.graph.node}
    for lin in linears:
        w = initializer_array(model, lin.weight)
        fdt = w.dtype
        nodes = plan.setdefault(lin.node, [])
        if lin.act not in done_acts:
            role = roles[lin.act]
            s, z = f"{role}/input_scale", f"{role}/input_zero_point"
            new_inits += [tensor_proto(s, np.array(scales[role], fdt)), tensor_proto(z, _zeros((), precision))]
            q, dq = f"{role}/input_quantized", f"{role}/input_dequantized"
            nodes += [helper.make_node("QuantizeLinear", [lin.act, s, z], [q], name=f"{role}/input_QuantizeLinear"),
                      helper.make_node("DequantizeLinear", [q, s, z], [dq], name=f"{role}/input_DequantizeLinear")]
            done_acts[lin.act] = dq
        amax = np.abs(w.astype(np.float32)).max(axis=0)
        ws = np.where(amax > 0, amax / QMAX[precision], 1.0).astype(np.float32)
        qw = _to_qtype(w.astype(np.float32) / ws, precision)
        qn, sn, zn = f"{lin.weight}_quantized", f"{lin.weight}_scale", f"{lin.weight}_zero_point"
        if not any(t.name == qn for t in new_inits):
            new_inits += [tensor_proto(qn, qw), tensor_proto(sn, ws.astype(fdt)), tensor_proto(zn, _zeros(ws.shape, precision))]
        dqw = f"{lin.weight}_dequantized"
        if not any(n.output[0] == dqw for ns in plan.values() for n in ns):
            nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [dqw], axis=1,
                                          name=f"{lin.node}/weight_DequantizeLinear"))
        mm = by_name[lin.node]
        mm.input[0], mm.input[1] = done_acts[lin.act], dqw
    model.graph.initializer.extend(new_inits)
    insert_before(model, plan)
    drop_unused(model)
    return len(linears)


def keep_bias_adds_unfused(model) -> int:
    """Give the bias of every `Add(quantized MatMul, bias)` the shape [1, 1, N] (was [N]).

    Workaround: ONNX Runtime 1.32 (graph optimization level EXTENDED or ALL) fuses MatMul + 1-D
    bias Add into Gemm with reshapes, then moves the Q/DQ pair across the new Reshape and builds
    an invalid node: "Node (gemm_input_reshape_arg_q) Op (QuantizeLinear) [TypeInferenceError]
    output_dtype INT8 does not match y_zero_point type UINT8" at session load (Qwen2's q/k/v
    biases). The fusion needs a bias Gemm can take; a 3-D one broadcasts the same and is left
    alone. Returns the number of biases reshaped.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "MatMul" and dequantized & set(n.input)}
    count = 0
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        for a, b in ((0, 1), (1, 0)):
            t = inits.get(n.input[b])
            if n.input[a] in quantized and t is not None and len(t.dims) == 1:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(1, 1, -1), t.name))
                count += 1
    return count
