"""tidar_graphs: ONNX-side passes, per-target lowering and the target checker (no torch).

    TARGETS                      ("ort", "trt-10.3", "trt-10.15")
    get_target(name)             a target's opset, op table, shape rules and KV update mode
    lower(model, target)         cleanup + fusion/decomposition + opset conversion; same numerics
    prepare_weights(model, t)    the target's weight passes on a traced onnx_ir model, before its weights are written
    check_graph(model, target)   every way the graph breaks the target's rules, one message each

See docs/GRAPHS.md for what each target's pipeline does and where the operator tables come from.
"""

from tidar_graphs.checker import check_graph
from tidar_graphs.targets import TARGETS, get_target, lower, prepare_weights

__all__ = ["TARGETS", "check_graph", "get_target", "lower", "prepare_weights"]
