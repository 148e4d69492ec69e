"""Check an ONNX graph against a target: operators, types, attributes, opset, shapes.

`check_graph(model, target)` returns one message per failure ([] means the graph passes):

- the model is valid ONNX (onnx.checker) and imports an opset and domains the target accepts;
- every node's operator is in the target's operator table (graphs/optables/<target>.json,
  transcribed from the TensorRT ONNX parser's published support list; `ort` accepts any
  standard operator), its data types are in the table's list for that operator (this is where
  int64 misuse shows up: e.g. TensorRT lists Clip, Softmax and TensorScatter without INT64),
  and the restrictions the table marks as checks hold (4-D Attention without cache inputs,
  TensorScatter on axis -2, constant axes, ...);
- graph inputs and outputs have types the target can bind and, for TensorRT targets, static
  dims. A dynamic dim is allowed only when its name (or every name in a dim expression such
  as "s0 + 4") is listed in `dynamic_dims`: prefill graphs may keep a dynamic prompt length,
  step and ar_step graphs must be fully static.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from importlib import resources

import onnx
import onnx_ir as ir

from tidar_graphs.cleanup import infer_shapes
from tidar_graphs.targets import get_target

# TensorRT's names for ONNX element types, as the operator tables use them.
_TYPE_NAMES = {
    ir.DataType.FLOAT: "FP32", ir.DataType.FLOAT16: "FP16", ir.DataType.BFLOAT16: "BF16",
    ir.DataType.DOUBLE: "DOUBLE", ir.DataType.INT32: "INT32", ir.DataType.INT64: "INT64",
    ir.DataType.INT8: "INT8", ir.DataType.UINT8: "UINT8", ir.DataType.BOOL: "BOOL",
    ir.DataType.INT4: "INT4", ir.DataType.FLOAT8E4M3FN: "FP8", ir.DataType.FLOAT4E2M1: "FP4",
    ir.DataType.INT16: "INT16", ir.DataType.UINT16: "UINT16", ir.DataType.UINT32: "UINT32",
    ir.DataType.UINT64: "UINT64", ir.DataType.STRING: "STRING",
}
_FLOAT_TYPE_STRS = {"tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"}


@functools.lru_cache(maxsize=None)
def load_table(name: str) -> dict:
    """An operator table from graphs/optables/ (see its "source" entry for provenance)."""
    text = resources.files("tidar_graphs").joinpath("optables", name).read_text()
    return json.loads(text)


def _type_name(dtype: ir.DataType | None) -> str | None:
    return None if dtype is None else _TYPE_NAMES.get(dtype, dtype.name)


def _checked_params(schema: onnx.defs.OpSchema, entry: dict) -> set[str]:
    """Type parameters whose tensors the table's type list applies to.

    By default the data-type parameters: those that admit a float type. Index, shape and
    mask parameters (int-only or bool-only) are not what the table's types describe.
    """
    if "type_params" in entry.get("checks", {}):
        return set(entry["checks"]["type_params"])
    return {c.type_param_str for c in schema.type_constraints
            if _FLOAT_TYPE_STRS & set(c.allowed_type_strs)}


def _formal(params, index: int):
    """The formal parameter an actual input/output index binds to (variadic tails included)."""
    if index < len(params):
        return params[index]
    last = params[-1] if params else None
    if last is not None and last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return last
    return None


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True  # an omitted optional input is not a runtime tensor
    if value.const_value is not None:
        return True
    node = value.producer()
    return node is not None and node.op_type == "Constant"


def _attribute_value(node: ir.Node, schema: onnx.defs.OpSchema, name: str):
    """The node's attribute value, else the schema default, else None (strings as str)."""
    attr = node.attributes.get(name)
    if attr is not None:
        value = attr.value
    else:
        formal = schema.attributes.get(name)
        default = None if formal is None else formal.default_value
        if default is None or default.type == onnx.AttributeProto.UNDEFINED:
            return None
        value = onnx.helper.get_attribute_value(default)
    return value.decode() if isinstance(value, bytes) else value


def _node_label(node: ir.Node) -> str:
    return f"node '{node.name or '?'}' ({node.op_type})"


def _check_node(node: ir.Node, opset: int, table: dict, target: str) -> list[str]:
    label = _node_label(node)
    domain = "" if node.domain == "ai.onnx" else node.domain
    if domain not in table["domains"]:
        return [f"{label}: domain '{domain}' is not supported by {target}"]
    if domain != "":
        return []  # contrib ops (ort only): no schema table here
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, domain)
    except onnx.defs.SchemaError:
        return [f"{label}: no such operator in ONNX opset {opset}"]
    ops = table["ops"]
    if ops is None:
        return []
    entry = ops.get(node.op_type)
    if entry is None:
        how = "lists it as unsupported" if node.op_type in table["unsupported"] else "does not list it"
        return [f"{label}: not supported by {target} (its operator table {how})"]

    failures = []
    allowed = entry["types"]
    checked = _checked_params(schema, entry)
    wrong: dict[str, list[str]] = {}  # dtype -> the tensors of that dtype the table rejects
    for kind, values, params in (("input", node.inputs, schema.inputs), ("output", node.outputs, schema.outputs)):
        for i, value in enumerate(values):
            formal = _formal(params, i)
            if value is None or formal is None or formal.type_str not in checked:
                continue
            name = _type_name(value.dtype)
            if name is not None and name not in allowed:
                wrong.setdefault(name, []).append(f"{kind} {i} '{value.name}'")
    for name, tensors in wrong.items():
        failures.append(f"{label}: {name} data ({', '.join(tensors)}); {target} supports "
                        f"{node.op_type} for {', '.join(allowed)} only")

    checks = entry.get("checks", {})
    for index, rank in checks.get("rank", {}).items():
        i = int(index)
        value = node.inputs[i] if i < len(node.inputs) else None
        if value is not None and value.shape is not None and value.shape.rank() != rank:
            failures.append(f"{label}: input {i} '{value.name}' is {value.shape.rank()}-D; "
                            f"{target} needs {rank}-D")
    for i in checks.get("absent_inputs", []):
        if i < len(node.inputs) and node.inputs[i] is not None:
            failures.append(f"{label}: input {i} ('{schema.inputs[i].name}') is not supported by {target}")
    for i in checks.get("absent_outputs", []):
        if i < len(node.outputs) and node.outputs[i].name:
            failures.append(f"{label}: output {i} ('{schema.outputs[i].name}') is not supported by {target}")
    for name in checks.get("absent_attributes", []):
        if name in node.attributes:
            failures.append(f"{label}: attribute '{name}' is not supported by {target} "
                            "(remove it; lower() drops it when it has its default value)")
    for name, values in checks.get("attribute_values", {}).items():
        value = _attribute_value(node, schema, name)
        if value is not None and value not in values:
            failures.append(f"{label}: attribute {name}={value!r}; {target} supports {name} in {values} only")
    for i in checks.get("constant_inputs", []):
        if i < len(node.inputs) and not _is_constant(node.inputs[i]):
            failures.append(f"{label}: input {i} '{node.inputs[i].name}' must be a constant (initializer) for {target}")
    for index, types in checks.get("input_types", {}).items():
        i = int(index)
        value = node.inputs[i] if i < len(node.inputs) else None
        name = None if value is None else _type_name(value.dtype)
        if name is not None and name not in types:
            failures.append(f"{label}: input {i} '{value.name}' is {name}; {target} needs {', '.join(types)}")
    return failures


def _dim_names(dim) -> set[str]:
    """Identifiers in a symbolic dim ("s0 + 4" -> {"s0"}); empty for an unnamed dim."""
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", dim.value or ""))


def _check_bindings(graph: ir.Graph, target: str, table: dict, static: bool, allowed_dims: set[str]) -> list[str]:
    failures = []
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for value in values:
            name = _type_name(value.dtype)
            io_types = table.get("io_types")
            if io_types is not None and name is not None and name not in io_types:
                failures.append(f"graph {kind} '{value.name}' is {name}; {target} binds {', '.join(io_types)} only")
            if not static:
                continue
            if value.shape is None:
                failures.append(f"graph {kind} '{value.name}' has no shape; {target} needs static shapes")
                continue
            for axis, dim in enumerate(value.shape):
                if isinstance(dim, int):
                    continue
                names = _dim_names(dim)
                if names and names <= allowed_dims:
                    continue
                shown = f"'{dim.value}'" if dim.value else "unnamed"
                failures.append(
                    f"graph {kind} '{value.name}' dim {axis} is dynamic ({shown}); {target} needs static "
                    f"shapes (pass dynamic_dims=[...] naming it if this is an intended prefill dim)")
    return failures


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its initializers turned into typed graph inputs, for onnx.checker.

    The checker then validates nodes, types and structure without touching weight data: the
    graph may reference external data that is not loaded, or be larger than 2 GB.
    """
    skeleton = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, field, getattr(model, field))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g, src = skeleton.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    declared = {v.name for v in src.input}
    for t in src.initializer:
        if t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for t in src.sparse_initializer:
        if t.values.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.values.name, t.values.data_type, list(t.dims)))
    return skeleton


def check_graph(model: onnx.ModelProto, target: str, *, dynamic_dims: Iterable[str] = ()) -> list[str]:
    """Every way `model` breaks `target`'s rules, one message each; [] when it passes.

    dynamic_dims: names of symbolic dims that may stay dynamic on a TensorRT target (for a
    prefill's prompt length); everything else must be static there. Unknown target ->
    TiDARError.
    """
    spec = get_target(target)
    table = load_table(spec.table)
    failures: list[str] = []

    try:
        onnx.checker.check_model(_without_weights(model))
    except onnx.checker.ValidationError as e:
        failures.append(f"invalid ONNX model: {str(e).strip().splitlines()[0]}")

    opsets = {("" if op.domain == "ai.onnx" else op.domain): op.version for op in model.opset_import}
    opset = opsets.get("")
    lo, hi = table["opset"]["min"], table["opset"]["max"]
    if opset is None:
        failures.append(f"the model imports no default-domain opset; {target} needs opset {lo}..{hi}")
        opset = hi
    elif not lo <= opset <= hi:
        failures.append(f"opset {opset} is outside {target}'s range {lo}..{hi}")
    for domain in opsets:
        if domain not in table["domains"]:
            failures.append(f"opset domain '{domain}' is not supported by {target}")

    ir_model = ir.serde.deserialize_model(model)
    infer_shapes(ir_model)
    failures += _check_bindings(ir_model.graph, target, table, spec.static_shapes, set(dynamic_dims))
    schema_opset = min(max(opset, 1), onnx.defs.onnx_opset_version())
    for node in ir.traversal.RecursiveGraphIterator(ir_model.graph):
        failures += _check_node(node, schema_opset, table, target)
    for function in ir_model.functions.values():
        for node in function:
            failures += _check_node(node, opset, table, target)
    return failures
