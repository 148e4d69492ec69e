"""Matching helpers shared by the rewrite rules: constants, dims, attributes, node names.

Internal to tidar_graphs: the rule modules (fusions, decompositions, fixups) use these to read
an onnx_ir value's constant, shape or attribute while checking a match, to build constants in
a rewrite, and `apply` to run a rule set and re-infer shapes when something fired.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from tidar_graphs.cleanup import infer_shapes

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
INT_TYPES = (ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
              ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64)


def const(value: ir.Value | None) -> np.ndarray | None:
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


def scalar(value: ir.Value | None):
    arr = const(value)
    if arr is None or arr.size != 1:
        return None
    return arr.reshape(()).item()


def ints(value: ir.Value | None) -> list[int] | None:
    arr = const(value)
    if arr is None or arr.dtype.kind not in "iu":
        return None
    return [int(x) for x in arr.reshape(-1)]


def dims(value: ir.Value | None) -> tuple | None:
    """Shape as a tuple of ints / ir.SymbolicDim, or None when the rank is unknown."""
    if value is None or value.shape is None:
        return None
    return tuple(value.shape)


def static(dim) -> bool:
    return isinstance(dim, int)


def same(a, b) -> bool:
    """Two dims known to be equal: equal ints, or the same named symbolic dim."""
    if static(a) or static(b):
        return a == b
    return a.value is not None and a.value == b.value


def compatible(a, b) -> bool:
    """Equal static dims, or two symbolic dims (possibly under different names).

    The tracers rename dims on graph outputs ("prompt_len + 4" becomes "prefill_len") while
    the same dim inside the graph keeps the exporter's name, so names cannot be compared
    across a graph output.
    """
    if static(a) or static(b):
        return a == b
    return True


def axes_equal(axes: list[int] | None, expected: int, rank: int) -> bool:
    return axes is not None and len(axes) == 1 and axes[0] % rank == expected % rank


def fail(reason: str, *values):
    return pattern.MatchResult().fail(reason, list(values) or None)


def attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def named_after(new: ir.Value, old: ir.Value) -> ir.Value:
    """Name the node producing `new` in the module scope of the node it replaces.

    Traced graphs name nodes by module path ("/model/layers.0/self_attn/MatMul_3"); the fused
    node becomes "/model/layers.0/self_attn/Attention" (the final cleanup makes names unique).
    Names without a scope are left to the rewriter's default.
    """
    node, old_node = new.producer(), old.producer()
    if node is not None and old_node is not None and "/" in (old_node.name or ""):
        node.name = f"{old_node.name.rsplit('/', 1)[0]}/{node.op_type}"
    return new


def i64(op, values):
    return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))


def f(op, value: float, dtype: ir.DataType):
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype.numpy())))


def apply(rules: list[pattern.RewriteRule], model: ir.Model, commute: bool = True) -> int:
    count = pattern.RewriteRuleSet(rules, commute=commute).apply_to_model(model)
    if count:
        infer_shapes(model)
    return count
