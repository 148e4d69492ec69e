"""Graph anatomy: the linear layers, activation roles and embedding/LM-head tables of an ONNX graph, and
the small protobuf edits the quantizers share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


# Scopes whose MatMuls stay unquantized: the LM head (its error reaches every logit that the
# verification compares) -- node names are module paths (docs/EXPORT.md).
EXCLUDED_SCOPES = ("/lm_head/", "/adapter/")  # and a draft adapter's small MatMuls: kept float


@dataclasses.dataclass(frozen=True)
class Linear:
    """One linear layer of a graph: MatMul(x, W) with W an [in, out] initializer."""

    node: str  # the MatMul's name: a module path, the same in prefill, step and ar_step
    weight: str
    act: str  # the activation input's tensor name in this graph (differs between graphs)


def linear_layers(model) -> list[Linear]:
    """The MatMuls to quantize: a 2-D weight initializer as second input, LM head excluded."""
    inits = {t.name: t for t in model.graph.initializer}
    return [Linear(n.name, n.input[1], n.input[0]) for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and not any(s in n.name for s in EXCLUDED_SCOPES)]


def quantized_nodes(model) -> list[str]:
    return [lin.node for lin in linear_layers(model)]


def activation_roles(linears: Sequence[Linear]) -> dict[str, str]:
    """Activation tensor -> its role: the first (by name) linear layer reading it. One tensor
    read by q, k and v gets one role; the role names agree across the three graphs, the tensor
    names do not."""
    consumers: dict[str, list[str]] = {}
    for lin in linears:
        consumers.setdefault(lin.act, []).append(lin.node)
    return {act: min(nodes) for act, nodes in consumers.items()}


@dataclasses.dataclass
class TableUse:
    """The embedding lookup and the LM head of a graph, and the table(s) they read."""

    gather: object | None  # NodeProto: Gather(table [V, K], ids)
    head: object | None  # NodeProto: the LM head MatMul(x, W [K, V])
    table: str | None  # the [V, K] initializer the Gather reads
    head_weight: str | None  # [K, V] initializer of an untied head, or None when it is Transpose(table)
    head_table: str | None  # [V, K] initializer behind the head's Transpose (tied: == table)


def table_use(model) -> TableUse:
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and len(inits[n.input[0]].dims) == 2 and "embed_tokens" in n.name), None)
    head = next((n for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith("/lm_head/")), None)
    head_weight = head_table = None
    if head is not None:
        w = head.input[1]
        if w in inits and len(inits[w].dims) == 2:
            head_weight = w
        elif w in producer and producer[w].op_type == "Transpose" and producer[w].input[0] in inits:
            head_table = producer[w].input[0]
    return TableUse(gather, head, gather.input[0] if gather is not None else None, head_weight, head_table)


def initializer_array(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def replace_initializer(model, name: str, array: np.ndarray) -> None:
    from onnx import numpy_helper

    t = next(t for t in model.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(t).dtype), name))


def drop_unused(model) -> None:
    """Remove nodes whose outputs nobody reads and initializers no node reads."""
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def insert_before(model, plan: dict[str, list]) -> None:
    """Rebuild the node list with plan[node name] emitted right before that node (topological
    order kept: the new nodes read only initializers and tensors made before it)."""
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for n in nodes:
        model.graph.node.extend(plan.get(n.name, []))
        model.graph.node.append(n)


def tensor_proto(name: str, array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array), name)
