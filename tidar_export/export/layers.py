"""Repeat the last decoder layer of a lowered graph: export at the tracing cost of two layers.

Tracing and lowering cost grows with the number of layers (torch.export, torch.onnx's
optimizer and the target's rewrite passes visit every node), while every decoder layer lowers
to the same nodes with other weights. So the exporter traces and lowers a two-layer copy of the
model (the same modules and forward, `first_layers`) and `repeat_last_layer` then appends
copies of layer 1 until the graph has all of the model's layers, each copy reading its own
layer's weights and cache bindings. Two layers, not one: what layer 1 shares with layer 0
(the rotary tables, the attention mask, constants merged by the cleanup passes) is what every
copy shares, and the value that flows from layer 0 into layer 1 is the layer's input.

Which nodes make up layer 1 is decided by data flow, with the node names (module paths,
"/model/layers.1/...") used only to find where the residual stream enters and leaves it:
layer 1 is every node that depends on its input (the residual stream after layer 0) or on
its own cache inputs (past_key_values.1.*) and that its outputs (the residual stream after
it, present.1.*) depend on. Everything else is shared. A graph this does not recognise
raises `CannotRepeat` and the exporter traces the whole model instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

TEMPLATE_LAYERS = 2
_LAYER = re.compile(r"\b(layers|past_key_values|present)\.1(?=[./])")


class CannotRepeat(Exception):
    """The graph's layers do not have the form `repeat_last_layer` relies on (the message says why)."""


def layer_name(name: str, k: int) -> str:
    """A name of layer 1 as the same name of layer k ("model.layers.1.mlp..." -> "model.layers.k.mlp...")."""
    return _LAYER.sub(rf"\g<1>.{k}", name)


def first_layers(model, n: int = TEMPLATE_LAYERS):
    """A TiDARModel of the model's first `n` layers, holding the same parameter objects (tied
    weights stay one object): the template that the exporter traces."""
    import torch

    from tidar_export.model.transformer import TiDARModel

    with torch.device("meta"):
        template = TiDARModel(model.cfg.replace(num_layers=n))
    source = dict(model.named_modules())
    for name, module in template.named_modules():
        for key in module._parameters:
            module._parameters[key] = source[name]._parameters[key]
        for key in module._buffers:
            module._buffers[key] = source[name]._buffers[key]
    return template.eval()


def repeat_last_layer(model: ir.Model, num_layers: int,
                      weight: Callable[[ir.Value, int], ir.TensorProtocol | None]) -> int:
    """Append copies of layer 1 to the two-layer `model` (in place) until it has `num_layers`.

    weight(value, k): layer k's tensor for layer 1's initializer `value` (None: it is no
    checkpoint weight; then it must equal layer 0's counterpart, a constant, and is shared).
    Returns the number of layers added.
    """
    g = model.graph
    nodes = list(g)
    x_in, x_out = _residual_stream(nodes)
    layer = _layer_nodes(g, nodes, x_in, x_out)
    pasts = [v for v in g.inputs if v.name.startswith("past_key_values.1.")]  # none in the prefill
    presents = [v for v in g.outputs if v.name.startswith("present.1.")]
    if not presents:
        raise CannotRepeat("layer 1 has no present.1.* outputs")
    members = set(map(id, layer))
    for node in layer:  # nothing of layer 1 but its residual output and present.1.* may leave it
        for out in node.outputs:
            outside = [c for c in out.consumers() if id(c) not in members]
            if outside and out is not x_out:
                raise CannotRepeat(f"{out.name} of layer 1 is read outside it by {outside[0].name}")
            if out.is_graph_output() and out not in presents:
                raise CannotRepeat(f"layer 1 produces the graph output {out.name}")
    per_layer = _layer_initializers(g, layer, members, nodes, weight)
    readers = [c for c in x_out.consumers() if id(c) not in members]
    prev_out = x_out
    for k in range(TEMPLATE_LAYERS, num_layers):
        mapping: dict[int, ir.Value] = {id(x_in): prev_out}
        for past in pasts:
            new = _like(past, layer_name(past.name, k))
            g.inputs.append(new)
            mapping[id(past)] = new
        for value, make in per_layer.items():
            tensor = make(k)
            new = ir.Value(name=layer_name(value.name, k), shape=_shape(value), type=value.type, const_value=tensor)
            g.register_initializer(new)
            mapping[id(value)] = new
        block = [_copy(node, k, mapping) for node in layer]
        g.extend(block)
        for present in presents:
            g.outputs.append(mapping[id(present)])
        prev_out = mapping[id(x_out)]
    for reader in readers:  # the final norm reads the last layer's output
        for i, inp in enumerate(reader.inputs):
            if inp is x_out:
                reader.replace_input_with(i, prev_out)
    g.sort()
    return num_layers - TEMPLATE_LAYERS


def _scoped(node: ir.Node, k: int) -> bool:
    return (node.name or "").startswith(f"/model/layers.{k}/")


def _residual_stream(nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value]:
    """(layer 1's input, layer 1's output): the float value that layer 0's nodes hand to layer 1's
    (the residual stream), and the output of layer 1's node of the same name and position.

    Integer values may cross too: shape computations of the dynamic prefill that the cleanup
    merged into layer 0's scope; they do not depend on any layer's data and stay shared."""
    by_name = {n.name: n for n in nodes}
    found = []
    for node in nodes:
        if not _scoped(node, 0):
            continue
        for index, value in enumerate(node.outputs):
            if not any(_scoped(c, 1) for c in value.consumers()):
                continue
            if value.dtype is None or not value.dtype.is_floating_point():
                continue
            found.append((node, index, value))
    if len(found) != 1:
        raise CannotRepeat(f"{len(found)} float values flow from layer 0 into layer 1 (one expected)")
    node0, index, x_in = found[0]
    node1 = by_name.get(node0.name.replace("/model/layers.0/", "/model/layers.1/", 1))
    if node1 is None or len(node1.outputs) <= index or node1.op_type != node0.op_type:
        raise CannotRepeat(f"layer 1 has no node like layer 0's {node0.name}")
    return x_in, node1.outputs[index]


def _layer_nodes(g: ir.Graph, nodes: list[ir.Node], x_in: ir.Value, x_out: ir.Value) -> list[ir.Node]:
    """Layer 1, in graph order: nodes downstream of its input or its cache inputs (not past its
    output) that its output or present.1.* depend on."""
    sources = {id(x_in)} | {id(v) for v in g.inputs if v.name.startswith("past_key_values.1.")}
    forward: set[int] = set()
    reached = set(sources)
    for node in nodes:  # graph order is topological
        if any(v is not None and id(v) in reached for v in node.inputs):
            forward.add(id(node))
            reached.update(id(o) for o in node.outputs if o is not x_out)
    backward: set[int] = set()
    stack = [x_out] + [v for v in g.outputs if v.name.startswith("present.1.")]
    seen = set()
    while stack:
        v = stack.pop()
        if id(v) in seen or id(v) in sources:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is not None and id(node) in forward:
            backward.add(id(node))
            stack.extend(i for i in node.inputs if i is not None)
    layer = [n for n in nodes if id(n) in backward]
    if not any(_scoped(n, 1) for n in layer):
        raise CannotRepeat("no node of layer 1 lies between its input and its outputs")
    return layer


def _layer_initializers(g: ir.Graph, layer: list[ir.Node], members: set[int], nodes: list[ir.Node],
                        weight) -> dict[ir.Value, Callable[[int], ir.TensorProtocol]]:
    """Layer 1's own initializers (read by no node outside it), each with how to make layer k's.
    A checkpoint weight comes from `weight`; any other must equal its layer-0 counterpart (a
    constant the cleanup passes did not merge), which is then shared by every copy."""
    by_name = {n.name: n for n in nodes}
    own: dict[ir.Value, Callable[[int], ir.TensorProtocol]] = {}
    for node in layer:
        for i, v in enumerate(node.inputs):
            if v is None or not v.is_initializer() or v in own:
                continue
            if any(id(c) not in members for c in v.consumers()):
                continue  # shared with layer 0 or the rest of the graph
            if weight(v, TEMPLATE_LAYERS) is not None:
                own[v] = lambda k, v=v: weight(v, k)
                continue
            twin = by_name.get(layer_name(node.name, 0) if _LAYER.search(node.name) else "")
            other = twin.inputs[i] if twin is not None and i < len(twin.inputs) else None
            if not (other is not None and _equal_constants(v, other)):
                raise CannotRepeat(f"initializer {v.name} of layer 1 is no checkpoint weight and differs "
                                   f"from layer 0's")
            own[v] = lambda k, v=v: v.const_value
    for node in nodes:  # a shared node must not read layer 1's weights (its copies would too)
        if id(node) not in members and any(v in own for v in node.inputs if v is not None):
            raise CannotRepeat(f"{node.name} outside layer 1 reads its weights")
    return own


def _equal_constants(a: ir.Value, b: ir.Value) -> bool:
    ta, tb = a.const_value, b.const_value
    if ta is None or tb is None or isinstance(ta, ir.ExternalTensor) or isinstance(tb, ir.ExternalTensor):
        return False
    return ta.dtype == tb.dtype and np.array_equal(ta.numpy(), tb.numpy())


def _like(value: ir.Value, name: str) -> ir.Value:
    return ir.Value(name=name, shape=_shape(value), type=value.type)


def _shape(value: ir.Value) -> ir.Shape | None:
    return None if value.shape is None else ir.Shape(list(value.shape))


def _copy(node: ir.Node, k: int, mapping: dict[int, ir.Value]) -> ir.Node:
    """Layer 1's `node` as layer k's: inputs through `mapping` (which gets its outputs), names
    with layer k's index (values without one get a "_l{k}" suffix)."""
    inputs = [None if v is None else mapping.get(id(v), v) for v in node.inputs]
    copy = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                   overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                   name=_renamed(node.name, k))
    for old, new in zip(node.outputs, copy.outputs):
        new.name = _renamed(old.name, k)
        new.type, new.shape = old.type, _shape(old)
        mapping[id(old)] = new
    return copy


def _renamed(name: str | None, k: int) -> str | None:
    if not name:
        return name
    new = layer_name(name, k)
    return new if new != name else f"{name}_l{k}"
