"""AWQ-style scales for weight-only quantization: s = mean|x|^alpha per input channel, alpha searched
per layer group on calibration rows, 1/s folded into the RMSNorm weight / up_proj / v_proj before it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tidar_export.errors import TiDARError
from tidar_export.quantize.graph import activation_roles, initializer_array, linear_layers
from tidar_export.quantize.stats import ActStats
from tidar_export.quantize.weight_only import AWQ_ALPHAS, block_dequantize, block_quantize

@dataclasses.dataclass
class AwqGroup:
    role: str  # the activation role the group's linear layers read
    linears: list[str]  # their MatMul names
    # where 1/s goes: ("gamma", init) | ("columns", weight, (start, stop)) | ("v_proj", weight, (start, stop));
    # None: RTN. The column range is the part of `weight` (and of its bias) that is divided: all of
    # up_proj / v_proj, or the up / v columns inside a fused gate_up / qkv weight.
    fold: tuple | None
    alpha: float = 0.0
    scales: np.ndarray | None = None


def output_bias(model, weight: str) -> str | None:
    """The bias initializer added to the output of the MatMul that reads `weight` (Qwen2's
    q/k/v biases), or None."""
    inits = {t.name: t for t in model.graph.initializer}
    mm = next((n for n in model.graph.node if n.op_type == "MatMul" and n.input[1:] == [weight]), None)
    if mm is None:
        return None
    for n in model.graph.node:
        if n.op_type == "Add" and mm.output[0] in n.input:
            other = [i for i in n.input if i != mm.output[0]]
            if other and other[0] in inits and len(inits[other[0]].dims) == 1:
                return other[0]
    return None


def output_columns(model) -> dict[str, tuple[str, int, int]]:
    """Tensor -> (weight, start, stop): the output columns start..stop-1 of a linear layer's
    weight that a tensor holds. The MatMul's output (and its bias Add's) holds all of them; each
    output of a Split along the last axis of it holds its part (`tidar_graphs.fusions.fuse_projections`
    packs q/k/v and gate/up into one MatMul and splits its output)."""
    inits = {t.name: t for t in model.graph.initializer}
    cols: dict[str, tuple[str, int, int]] = {}
    for lin in linear_layers(model):
        mm = next(n for n in model.graph.node if n.name == lin.node)
        cols[mm.output[0]] = (lin.weight, 0, int(inits[lin.weight].dims[1]))
        bias = output_bias(model, lin.weight)
        for n in model.graph.node:
            if bias is not None and n.op_type == "Add" and mm.output[0] in n.input and bias in n.input:
                cols[n.output[0]] = cols[mm.output[0]]
    for n in model.graph.node:
        if n.op_type != "Split" or not n.input or n.input[0] not in cols or len(n.input) < 2 or n.input[1] not in inits:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if axis not in (-1, 2):  # the [B, T, N] projections: the last axis
            continue
        weight, start, _ = cols[n.input[0]]
        for out, width in zip(n.output, initializer_array(model, n.input[1]).tolist()):
            cols[out] = (weight, start, start + int(width))
            start += int(width)
    return cols


def awq_groups(model, manifest_model: dict) -> list[AwqGroup]:
    """The linear layers grouped by the activation they read, with the op that can absorb 1/s:
    the RMSNorm (or Mul) weight before q/k/v and gate/up, the up_proj output columns before
    down_proj (silu(gate) * up is linear in up), the v_proj output columns before o_proj
    (attention is linear in V; one scale per kv-head channel, shared by its query heads). With
    fused projections the up and v columns are those parts of the gate_up and qkv weights."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    linears = linear_layers(model)
    by_node = {lin.node: lin for lin in linears}
    cols = output_columns(model)
    heads, kv = manifest_model.get("num_heads"), manifest_model.get("num_kv_heads")
    roles = activation_roles(linears)
    groups = []
    for act, role in sorted(roles.items(), key=lambda kv: kv[1]):
        members = sorted(lin.node for lin in linears if lin.act == act)
        k = inits[by_node[members[0]].weight].dims[0]
        p = producer.get(act)
        fold = None
        if p is not None and p.op_type in ("RMSNormalization", "SimplifiedLayerNormalization", "Mul"):
            gammas = [i for i in p.input[1:] if i in inits and list(inits[i].dims) == [k]]
            if p.op_type != "Mul" and len(p.input) > 1 and p.input[1] in inits and list(inits[p.input[1]].dims) == [k]:
                fold = ("gamma", p.input[1])
            elif p.op_type == "Mul" and gammas:
                fold = ("gamma", gammas[0])
            elif p.op_type == "Mul":
                ups = [cols[i] for i in p.input if i in cols]
                if len(ups) == 1 and ups[0][2] - ups[0][1] == k:
                    fold = ("columns", ups[0][0], ups[0][1:])
        if fold is None and "/self_attn/o_proj/" in role and heads and kv:
            hd = k // heads
            v = by_node.get(role.replace("/o_proj/", "/v_proj/"))
            qkv = by_node.get(role.replace("/o_proj/", "/qkv_proj/"))
            if v is not None:
                fold = ("v_proj", v.weight, (0, kv * hd))
            elif qkv is not None and inits[qkv.weight].dims[1] == (heads + 2 * kv) * hd:
                fold = ("v_proj", qkv.weight, ((heads + kv) * hd, (heads + 2 * kv) * hd))  # q | k | v columns
        groups.append(AwqGroup(role, members, fold))
    return groups


def awq_search(model, groups: list[AwqGroup], stats: dict[str, ActStats], bits: int, block: int,
               manifest_model: dict) -> None:
    """Per group, the activation-aware scales s = mean|x|^alpha (normalized), alpha chosen on a
    grid to minimize || X W - X diag(1/s) Q(diag(s) W) ||^2 summed over the group's layers,
    X = the calibration rows of the role (AWQ's search, without its clipping step)."""
    heads, kv = manifest_model.get("num_heads"), manifest_model.get("num_kv_heads")
    by_node = {lin.node: lin for lin in linear_layers(model)}
    for g in groups:
        s = stats.get(g.role)
        if g.fold is None or s is None or not s.rows:
            continue
        x = np.stack(s.rows).astype(np.float32)
        mean = (s.abs_sum / max(1, s.count)).astype(np.float64)
        if g.fold[0] == "v_proj":  # one scale per v channel: average over the query heads sharing it
            hd = len(mean) // heads
            mean = np.repeat(mean.reshape(kv, heads // kv, hd).mean(1), heads // kv, axis=0).reshape(-1)
        weights = [initializer_array(model, by_node[m].weight).astype(np.float32) for m in g.linears]
        refs = [x @ w for w in weights]
        best = None
        for alpha in AWQ_ALPHAS:
            sc = np.maximum(mean, 1e-8) ** alpha
            sc = (sc / np.sqrt(sc.max() * sc.min())).astype(np.float32)
            loss = 0.0
            for w, ref in zip(weights, refs):
                codes, scales = block_quantize((w * sc[:, None]).T, bits, block)
                w_hat = block_dequantize(codes, scales, w.shape[0]).T / sc[:, None]
                loss += float(((x @ w_hat - ref) ** 2).sum())
            if best is None or loss < best[0] - 1e-12 * abs(loss):
                best = (loss, alpha, sc)
        _, g.alpha, g.scales = best
        if g.alpha == 0.0:
            g.scales = None


def awq_folded_weights(model, groups: list[AwqGroup], manifest_model: dict) -> dict[str, np.ndarray]:
    """The float initializers after the AWQ scales are applied (identical for the three graphs):
    W <- diag(s) W for each group's layers, 1/s folded into the op before them."""
    heads, kv = manifest_model.get("num_heads"), manifest_model.get("num_kv_heads")
    by_node = {lin.node: lin for lin in linear_layers(model)}
    out: dict[str, np.ndarray] = {}

    def get(name):
        return out[name] if name in out else initializer_array(model, name).astype(np.float32)

    for g in groups:
        if g.scales is None:
            continue
        for m in g.linears:
            w = by_node[m].weight
            out[w] = get(w) * g.scales[:, None]
        kind, target = g.fold[:2]
        if kind == "gamma":
            out[target] = get(target) / g.scales
            continue
        if kind == "columns":
            s = g.scales
        else:  # v_proj columns: the kv-head channel behind each o_proj input channel
            hd = len(g.scales) // heads
            s = g.scales.reshape(heads, hd)[:: heads // kv].reshape(-1)
        start, stop = g.fold[2]
        if stop - start != len(s):
            raise TiDARError(f"AWQ: {len(s)} scales for columns {start}..{stop - 1} of {target}")
        w = get(target).copy()
        w[:, start:stop] /= s[None, :]
        out[target] = w
        bias = output_bias(model, target)  # the output channels divided by s carry their bias along
        if bias is not None:
            b = get(bias).copy()
            b[start:stop] /= s
            out[bias] = b
    return out


def value_cache_scales(groups: list[AwqGroup], manifest_model: dict) -> dict[str, list[float]]:
    """Per layer (its index as a string), the per-channel factor s that an o_proj group's fold
    divides v_proj's output columns by, in the cache's channel order ([kv_heads * head_dim],
    kv-head major): the artifact's V cache holds V / s, so a comparison against the unfolded
    model must scale caches by it (engines.compare). Layers without such a fold are absent."""
    heads, kv = manifest_model.get("num_heads"), manifest_model.get("num_kv_heads")
    out = {}
    for g in groups:
        if g.scales is None or g.fold is None or g.fold[0] != "v_proj":
            continue
        layer = g.role.split("/model/layers.", 1)[1].split("/", 1)[0]
        hd = len(g.scales) // heads
        out[layer] = [float(v) for v in g.scales.reshape(heads, hd)[:: heads // kv].reshape(-1)]
    return out
