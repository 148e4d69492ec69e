"""tidar_graphs: fusions, decompositions, per-target lowering and the target checker.

Graphs are traced here from a tiny model with torch.onnx's dynamo exporter at opset 18 (what
the tracers use), in the two KV layouts the targets use: "slice" (ort, trt-10.3: the graph
returns the new K/V) and "inplace" (trt-10.15: the graph writes them into the cache at L).
Every rewrite is checked by running the graph before and after it in ONNX Runtime (CPU).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

import tidar_graphs
from tests.conftest import random_model
from tidar_export.model import masks
from tidar_graphs import checker, cleanup, contrib, decompositions, fixups, fusions
from tidar_runtime.errors import TiDARError

S = 32  # cache slots of the traced step graphs
TOL = 1e-4  # max abs difference lowered vs unlowered (measured: below 1e-5 on the tiny model)


# --------------------------------------------------------------------------- tracing


class _Prefill(torch.nn.Module):
    def __init__(self, model, block_size):
        super().__init__()
        self.model, self.b = model, block_size

    def forward(self, input_ids):
        B, P = input_ids.shape
        ids = torch.cat([input_ids, input_ids.new_full((B, self.b), self.model.cfg.mask_token_id)], dim=1)
        positions = masks.prefill_positions(P, self.b)[None].expand(B, -1)
        logits, keys, values = self.model(ids, positions, masks.prefill_mask(P, self.b))
        return (logits, *keys, *values)


class _Cached(torch.nn.Module):
    def __init__(self, model, in_step, offsets, kv_update):
        super().__init__()
        self.model, self.kv_update = model, kv_update
        self.register_buffer("in_step", in_step, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)

    def forward(self, ids, cache_len, *past):
        n = self.model.cfg.num_layers
        positions = cache_len[:, None] + self.offsets[None]
        logits, keys, values = self.model(ids, positions, self.in_step, list(past[:n]), list(past[n:]),
                                          cache_len, self.kv_update)
        return (logits, *keys, *values)


def _trace(module, args, dynamic_shapes=None) -> onnx.ModelProto:
    with torch.no_grad():
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=18,
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    return program.model_proto


def _trace_graph(model, kind: str, kv_update: str = "slice") -> onnx.ModelProto:
    cfg, b = model.cfg, model.cfg.block_size
    if kind == "prefill":
        return _trace(_Prefill(model, b), (torch.randint(0, cfg.vocab_size, (1, 6)),))
    if kind == "step":
        module = _Cached(model, masks.step_mask(b), masks.step_offsets(b), kv_update)
        width = masks.step_len(b)
    else:
        module = _Cached(model, masks.causal_mask(1), torch.zeros(1, dtype=torch.long), kv_update)
        width = 1
    dtype = model.lm_head.weight.dtype
    past = [torch.zeros(1, cfg.num_kv_heads, S, cfg.head_dim, dtype=dtype) for _ in range(2 * cfg.num_layers)]
    return _trace(module, (torch.randint(0, cfg.vocab_size, (1, width)), torch.tensor([3]), *past))


@pytest.fixture(scope="module")
def tiny():
    return random_model(seed=1)


@pytest.fixture(scope="module")
def graphs(tiny):
    """{(kind, kv layout): traced ModelProto}; the prefill has no cache (layout "none")."""
    out = {("prefill", "none"): _trace_graph(tiny, "prefill")}
    for kind in ("step", "ar_step"):
        for layout in ("slice", "inplace"):
            out[(kind, layout)] = _trace_graph(tiny, kind, layout)
    return out


@pytest.fixture(scope="module")
def dynamic_prefill(tiny):
    """A prefill with dynamic batch and prompt length, named as the tracers name them.

    Like the tracers, the outputs' "prompt_len + 4" is renamed "prefill_len", so the graph's
    outputs and its intermediate values name the same dim differently.
    """
    dims = {"input_ids": {0: torch.export.Dim("prefill_batch", min=1),
                          1: torch.export.Dim("prompt_len", min=1, max=64)}}
    model = _trace(_Prefill(tiny, tiny.cfg.block_size), (torch.randint(0, 256, (2, 5)),), dims)
    for value in model.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == f"prompt_len + {tiny.cfg.block_size}":
                dim.dim_param = "prefill_len"
    return model


# --------------------------------------------------------------------------- running


def _feeds(model: onnx.ModelProto, batch: int = 1, prompt: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else prompt)
                 for i, d in enumerate(t.shape.dim)]
        if value.name == "cache_len":
            feeds[value.name] = np.full(shape, 5, dtype=np.int64)  # 5 + q_len <= S
        elif t.elem_type == TensorProto.INT64:
            feeds[value.name] = rng.integers(0, 256, shape, dtype=np.int64)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT's TensorScatter warns on every run that it copies the cache
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _max_diff(a: onnx.ModelProto, b: onnx.ModelProto, **kw) -> float:
    feeds = _feeds(a, **kw)
    return max(float(np.abs(x - y).max()) for x, y in zip(_run(a, feeds), _run(b, feeds)))


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _prepared(model: onnx.ModelProto, opset: int = 24) -> ir.Model:
    """What every lowering starts from: cleaned up, at the fused ops' opset, shapes inferred."""
    m = ir.serde.deserialize_model(model)
    cleanup.cleanup(m)
    cleanup.convert_opset(m, opset)
    cleanup.infer_shapes(m)
    return m


def _apply(model: ir.Model, *steps) -> tuple[onnx.ModelProto, list[int]]:
    counts = [step(model) for step in steps]
    cleanup.tidy(model)
    return ir.serde.serialize_model(model), counts


# --------------------------------------------------------------------------- fusions

L = 2  # layers of the tiny preset


@pytest.mark.parametrize("layout", ["slice", "inplace"])
def test_fuse_rms_norm(graphs, layout):
    original = graphs[("step", layout)]
    fused, (n,) = _apply(_prepared(original), fusions.fuse_rms_norm)
    assert n == 2 * L + 1  # input + post-attention norm per layer, final norm
    assert _ops(fused)["RMSNormalization"] == n and "ReduceMean" not in _ops(fused)
    assert _max_diff(original, fused) < TOL


def test_fuse_rotary(graphs):
    original = graphs[("step", "inplace")]
    fused, (n,) = _apply(_prepared(original), fusions.fuse_rotary)
    assert n == 2 * L  # q and k per layer
    assert _ops(fused)["RotaryEmbedding"] == n and "Neg" not in _ops(fused)
    assert _max_diff(original, fused) < TOL


@pytest.mark.parametrize("key", [("step", "slice"), ("step", "inplace"), ("prefill", "none")])
def test_fuse_attention_and_gqa(graphs, key):
    original = graphs[key]
    m = _prepared(original)
    fused_only, (n,) = _apply(m, fusions.fuse_attention)
    assert n == L and "Softmax" not in _ops(fused_only)
    assert _max_diff(original, fused_only) < TOL
    gqa, (n_gqa,) = _apply(m, fusions.fuse_attention_gqa)
    assert n_gqa == L
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*gqa.graph.value_info, *gqa.graph.input, *gqa.graph.output]}
    for node in gqa.graph.node:  # K and V enter with the model's 2 KV heads, Q with its 4 heads
        if node.op_type == "Attention":
            assert len(node.input) == 4 and [a.name for a in node.attribute] == ["scale"]
            assert [shapes[name][1] for name in node.input[:3]] == [4, 2, 2]
    assert _max_diff(original, gqa) < TOL


@pytest.mark.parametrize("kind", ["step", "ar_step"])
def test_kv_scatter_to_tensor_scatter(graphs, kind):
    original = graphs[(kind, "inplace")]
    fused, (n,) = _apply(_prepared(original), fusions.kv_scatter_to_tensor_scatter)
    assert n == 2 * L and "ScatterElements" not in _ops(fused)
    for node in fused.graph.node:
        if node.op_type == "TensorScatter":
            attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
            assert attrs == {"axis": -2, "mode": b"linear"}
    assert _max_diff(original, fused) < TOL


@pytest.fixture(scope="module")
def ar_step_16():
    """A scatter-layout AR step of a tiny model with 16-wide heads (GroupQueryAttention takes
    multiples of 16 only), and qk-norm, with the runtime's binding names. Two rows."""
    model = random_model(seed=3, head_dim=16, qk_norm=True)
    cfg = model.cfg
    module = _Cached(model, masks.causal_mask(1), torch.zeros(1, dtype=torch.long), "inplace")
    past = [torch.zeros(2, cfg.num_kv_heads, S, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    proto = _trace(module, (torch.randint(0, cfg.vocab_size, (2, 1)), torch.tensor([3, 9]), *past))
    m = ir.serde.deserialize_model(proto)
    m.graph.outputs[0].name = "logits"
    for i, (past_in, present_out) in enumerate(zip(m.graph.inputs[2:], m.graph.outputs[1:])):
        past_in.name, present_out.name = f"past_key_values.{i}", f"present.{i}"  # the runtime's pairing
    return ir.serde.serialize_model(m)


def test_ar_step_group_query_attention(ar_step_16):
    """The ort AR step becomes GroupQueryAttention (rotation and cache write inside); run as the
    runtime runs it, present.* bound to the past buffers, it equals the traced graph: logits,
    the new slot of each row, and every other slot unchanged."""
    from tidar_runtime.backends.ort import run_graph

    lowered = tidar_graphs.lower(ar_step_16, "ort", "ar_step", ar_step="gqa")
    ops = _ops(lowered)
    assert ops.get("GroupQueryAttention") == L and not {"Attention", "RotaryEmbedding", "TensorScatter",
                                                         "ScatterElements", "Concat"} & set(ops), ops
    assert json.loads(dict((p.key, p.value) for p in lowered.metadata_props)["tidar_graphs.passes"])[
        "ar_step_group_query_attention"] == L
    assert tidar_graphs.check_graph(lowered, "ort") == []
    rng = np.random.default_rng(5)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for m in (ar_step_16, lowered)]
    for lengths in ([0, 7], [S - 1, 12]):
        feeds = _feeds(ar_step_16, batch=2)
        feeds["cache_len"] = np.array(lengths, np.int64)
        for name in feeds:
            if name.startswith("past"):
                feeds[name] = rng.standard_normal(feeds[name].shape).astype(np.float32)
        before = {k: v.copy() for k, v in feeds.items()}
        want = run_graph(sessions[0], feeds, inplace=False)
        got = run_graph(sessions[1], feeds, inplace=True)
        assert all(np.array_equal(before[k], feeds[k]) for k in feeds)  # the caller's arrays are untouched
        assert np.abs(got["logits"] - want["logits"]).max() < TOL
        for name in (n for n in want if n.startswith("present")):
            assert np.abs(got[name] - want[name]).max() < TOL, name  # new slots, and the rest as passed in


def test_ar_step_group_query_attention_only_where_it_fits(graphs, ar_step_16):
    """Only the AR step in its gqa form, in the in-place layout, is rewritten (the target table runs
    the pass on that form alone; lowering the same graph as a step leaves it alone); a "slice" AR step
    is left alone by the pass; a head size that GroupQueryAttention refuses does not fit the form
    (Target.ar_step_fits), so the export keeps the AR step "slice"."""
    assert "GroupQueryAttention" not in _ops(tidar_graphs.lower(ar_step_16, "ort", "step"))
    concat = ir.serde.deserialize_model(graphs[("ar_step", "slice")])
    assert contrib.ar_step_group_query_attention(concat) == 0
    target = tidar_graphs.get_target("ort")
    assert target.form("ar_step", "gqa").kv_update == "inplace" and target.ar_step_fits(16)
    assert not target.ar_step_fits(8) and target.form("ar_step").kv_update == "slice"
    assert target.form("step", "gqa").kv_update == "slice" and target.form("prefill").kv_update is None
    assert tidar_graphs.get_target("trt-10.15").form("ar_step").kv_update == "inplace"
    assert not tidar_graphs.get_target("trt-10.15").ar_step_fits(16)


@pytest.mark.parametrize("length", [0, 5, S - masks.step_len(4)])
def test_attend_used_cache(graphs, length):
    """The ort step attends over max(cache_len) cache slots (Slice of cache and mask), not all S:
    the same outputs at an empty, a short and a full cache."""
    step = graphs[("step", "slice")]
    lowered = tidar_graphs.lower(step, "ort")
    assert json.loads(dict((p.key, p.value) for p in lowered.metadata_props)["tidar_graphs.passes"])[
        "attend_used_cache"] == L
    assert _ops(lowered)["Slice"] >= 2 * L + 1  # K and V of every layer, and the mask once
    feeds = _feeds(step)
    feeds["cache_len"] = np.full_like(feeds["cache_len"], length)
    got, want = _run(lowered, feeds), _run(step, feeds)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) < TOL


def test_int_clip_to_min_max(graphs):
    original = graphs[("step", "inplace")]  # the cache mask clamps int64 slot offsets
    fixed, (n,) = _apply(_prepared(original), fixups.int_clip_to_min_max)
    assert n == 1 and "Clip" not in _ops(fixed) and {"Max", "Min"} <= set(_ops(fixed))
    assert _max_diff(original, fixed) < TOL


def test_drop_default_attention_attributes():
    """torch writes softcap=0 and qk_matmul_output_mode=0 on Attention; both are dropped."""
    q = oh.make_tensor_value_info("q", TensorProto.FLOAT, [1, 4, 3, 8])
    kv = [oh.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 5, 8]) for n in ("k", "v")]
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 8])
    node = oh.make_node("Attention", ["q", "k", "v"], ["y"], softcap=0.0, qk_matmul_output_mode=0, is_causal=0)
    model = oh.make_model(oh.make_graph([node], "g", [q, *kv], [y]), opset_imports=[oh.make_opsetid("", 24)])
    m = ir.serde.deserialize_model(model)
    assert fixups.drop_default_attention_attributes(m) == 2
    fixed = ir.serde.serialize_model(m)
    assert [a.name for a in fixed.graph.node[0].attribute] == ["is_causal"]
    assert _max_diff(model, fixed) < TOL


def test_fusions_on_qwen3_mha_graph():
    """q/k RMSNorm (Qwen3) and plain MHA (as many KV heads as query heads) fuse as well."""
    model = random_model(seed=2, arch="qwen3", qk_norm=True, attention_bias=False, num_kv_heads=4)
    original = _trace_graph(model, "step", "inplace")
    lowered = tidar_graphs.lower(original, "trt-10.15")
    ops = _ops(lowered)
    assert ops["RMSNormalization"] == 4 * L + 1 and ops["Attention"] == L
    assert ops["RotaryEmbedding"] == 2 * L and ops["TensorScatter"] == 2 * L
    assert _max_diff(original, lowered) < TOL
    assert tidar_graphs.check_graph(lowered, "trt-10.15") == []


# Qwen2 (q/k/v biases), Qwen3 (qk-norm, no bias), Llama (neither); 16-wide heads (GroupQueryAttention)
PROJECTION_MODELS = {"qwen2-bias": dict(arch="qwen2", attention_bias=True),
                     "qwen3-qk-norm": dict(arch="qwen3", qk_norm=True, attention_bias=False),
                     "llama": dict(arch="llama", attention_bias=False)}


@pytest.mark.parametrize("name", PROJECTION_MODELS)
def test_fuse_projections(name, tmp_path, monkeypatch):
    """On the ort target the three graphs, traced as the exporter traces them (weights and nodes
    named by module path), get one MatMul for q/k/v per layer (gate/up stay apart), with
    concatenated weights (and biases) and a Split; nodes stay in the module scope; the AR step's
    GroupQueryAttention reads the packed q/k/v except with qk-norm (normalized per head after the
    Split). The lowered graphs compute what the traced, unfused ones compute."""
    from tidar_export.export.plan import make_plan
    from tidar_export.export.tracing import trace
    from tidar_runtime.backends.ort import run_graph

    model = random_model(seed=4, **PROJECTION_MODELS[name])
    cfg = model.cfg
    assert cfg.head_dim % 16 == 0
    plan = make_plan(cfg, target="ort", max_seq_len=S)
    qk_norm = cfg.qk_norm
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for kind in ("prefill", "step", "ar_step"):
        traced = ir.serde.serialize_model(trace(model, plan, kind))
        lowered = tidar_graphs.lower(traced, "ort", kind, plan.ar_step)  # as the exporter lowers it
        fired = json.loads({p.key: p.value for p in lowered.metadata_props}["tidar_graphs.passes"])
        assert fired["fuse_projections"] == L, (kind, fired)
        ops = _ops(lowered)
        assert ops["MatMul"] == 5 * L + 1, (kind, ops)  # qkv, o, gate, up, down and the LM head
        nodes = {n.name: n for n in lowered.graph.node}
        inits = {t.name for t in lowered.graph.initializer}
        for i in range(L):
            scope = f"/model/layers.{i}/self_attn/qkv_proj"
            assert nodes[f"{scope}/MatMul"].input[1] == f"model.layers.{i}.self_attn.qkv_proj.weight.T"
            assert (f"{scope}/Add" in nodes) == cfg.attention_bias
            assert f"/model/layers.{i}/mlp/gate_proj/MatMul" in nodes and f"/model/layers.{i}/mlp/up_proj/MatMul" in nodes
        parts = [t for t in inits if re.search(r"\.(q|k|v)_proj\.", t)]
        assert not parts, parts
        packed = kind == "ar_step" and not qk_norm
        assert ops.get("Split", 0) == (0 if packed else L), (kind, ops)
        if kind == "ar_step":
            gqa = [n for n in lowered.graph.node if n.op_type == "GroupQueryAttention"]
            assert len(gqa) == L and all((list(n.input[1:3]) == ["", ""]) == packed for n in gqa)
            producer = {o: n.name for n in lowered.graph.node for o in n.output}
            last = "Add" if cfg.attention_bias else "MatMul"
            assert all(producer[n.input[0]].endswith(f"/self_attn/qkv_proj/{last}") for n in gqa if packed)
        assert tidar_graphs.check_graph(lowered, "ort", dynamic_dims=["prefill_batch", "prompt_len",
                                                                      "prefill_len"]) == []
        if kind != "ar_step":
            assert _max_diff(traced, lowered) < TOL, kind
            continue
        sessions = [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                    for m in (traced, lowered)]
        rng = np.random.default_rng(6)
        feeds = _feeds(traced)
        for k in feeds:
            if k.startswith("past"):
                feeds[k] = rng.standard_normal(feeds[k].shape).astype(np.float32)
        want = run_graph(sessions[0], feeds, inplace=False)
        got = run_graph(sessions[1], feeds, inplace=True)
        for k in want:
            assert np.abs(np.asarray(got[k], np.float64) - want[k]).max() < TOL, k

    # weights out of reach (an external file that does not resolve from here): left unfused
    path = tmp_path / "step.onnx"
    onnx.save_model(ir.serde.serialize_model(trace(model, plan, "step")), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=256)
    proto = onnx.load(str(path), load_external_data=False)
    monkeypatch.chdir(tmp_path.parent)
    low = tidar_graphs.lower(proto, "ort")
    assert json.loads({p.key: p.value for p in low.metadata_props}["tidar_graphs.passes"])["fuse_projections"] == 0
    assert _ops(low)["MatMul"] == 7 * L + 1 and "Split" not in _ops(low)


# --------------------------------------------------------------------------- decompositions

DECOMPOSITIONS = [
    (decompositions.decompose_attention, "Attention", L),
    (decompositions.decompose_rms_norm, "RMSNormalization", 2 * L + 1),
    (decompositions.decompose_rotary, "RotaryEmbedding", 2 * L),
    (decompositions.decompose_tensor_scatter, "TensorScatter", 2 * L),
]


@pytest.fixture(scope="module")
def fused_step(graphs):
    return tidar_graphs.lower(graphs[("step", "inplace")], "trt-10.15")


@pytest.mark.parametrize("step, op, count", DECOMPOSITIONS, ids=[op for _, op, _ in DECOMPOSITIONS])
def test_decomposition(graphs, fused_step, step, op, count):
    """Each decomposition undoes its fused op exactly (GQA attention included)."""
    m = ir.serde.deserialize_model(fused_step)
    decomposed, (n,) = _apply(m, step)
    assert n == count and op not in _ops(decomposed)
    assert _max_diff(graphs[("step", "inplace")], decomposed) < TOL


def test_fused_graph_lowers_back_to_trt_10_3(graphs, fused_step):
    """A graph carrying opset-23/24 ops (e.g. traced at opset 24) lowers to decomposed opset 18."""
    lowered = tidar_graphs.lower(fused_step, "trt-10.3")
    assert lowered.opset_import[0].version == 18
    assert not {"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"} & set(_ops(lowered))
    assert _max_diff(graphs[("step", "inplace")], lowered) < TOL
    assert tidar_graphs.check_graph(lowered, "trt-10.3") == []


# --------------------------------------------------------------------------- lowering per target

LAYOUT = {"ort": "slice", "trt-10.3": "slice", "trt-10.15": "inplace"}
OPSET = {"ort": 23, "trt-10.3": 18, "trt-10.15": 24}
FUSED = {"Attention", "RMSNormalization", "RotaryEmbedding"}


@pytest.fixture(scope="module")
def lowered(graphs):
    """{(target, kind): (original, lowered)} for the KV layout each target uses."""
    out = {}
    for target in tidar_graphs.TARGETS:
        for kind in ("prefill", "step", "ar_step"):
            original = graphs[(kind, "none" if kind == "prefill" else LAYOUT[target])]
            out[(target, kind)] = (original, tidar_graphs.lower(original, target))
    return out


@pytest.mark.parametrize("target", tidar_graphs.TARGETS)
@pytest.mark.parametrize("kind", ["prefill", "step", "ar_step"])
def test_lowered_graph_matches_and_passes_checker(lowered, target, kind):
    original, low = lowered[(target, kind)]
    assert low.opset_import[0].version == OPSET[target]
    assert _max_diff(original, low) < TOL
    assert tidar_graphs.check_graph(low, target) == []
    meta = {p.key: p.value for p in low.metadata_props}
    assert meta["tidar_graphs.target"] == target
    fired = json.loads(meta["tidar_graphs.passes"])
    ops = set(_ops(low))
    if target == "trt-10.3":
        assert not FUSED & ops and "TensorScatter" not in ops
    else:
        assert fired["fuse_attention"] == fired["fuse_attention_gqa"] == L
        assert FUSED <= ops and "Softmax" not in ops
        assert ("TensorScatter" in ops) == (target == "trt-10.15" and kind != "prefill")


def test_lower_does_not_modify_its_input(graphs):
    original = graphs[("step", "inplace")]
    before = original.SerializeToString()
    tidar_graphs.lower(original, "trt-10.15")
    assert original.SerializeToString() == before


def test_fused_nodes_keep_the_module_scope(graphs):
    """Fused nodes are named in the scope of the node they replace (traced names are module paths)."""
    named = onnx.ModelProto()
    named.CopyFrom(graphs[("step", "inplace")])
    for i, node in enumerate(named.graph.node):
        node.name = f"/model/layers.0/self_attn/{node.op_type}_{i}"
    low = tidar_graphs.lower(named, "trt-10.15")
    names = [n.name for n in low.graph.node if n.op_type in ("Attention", "TensorScatter", "RotaryEmbedding")]
    assert names and all(n.startswith("/model/layers.0/self_attn/") for n in names)


def test_dynamic_prefill(dynamic_prefill):
    """Fusions fire with symbolic batch / prompt length; TRT targets name every dynamic dim."""
    feeds = dict(batch=3, prompt=7)
    for target in tidar_graphs.TARGETS:
        low = tidar_graphs.lower(dynamic_prefill, target)
        assert _max_diff(dynamic_prefill, low, **feeds) < TOL
        if target != "trt-10.3":
            fired = json.loads({p.key: p.value for p in low.metadata_props}["tidar_graphs.passes"])
            assert fired["fuse_attention"] == fired["fuse_attention_gqa"] == L
        failures = tidar_graphs.check_graph(low, target)
        if target == "ort":
            assert failures == []
            continue
        assert failures and all("is dynamic" in f for f in failures)
        for name in ("prefill_batch", "prompt_len", "prefill_len"):
            assert any(f"('{name}')" in f for f in failures)
        dynamic = ["prefill_batch", "prompt_len", "prefill_len"]
        assert tidar_graphs.check_graph(low, target, dynamic_dims=dynamic) == []


def test_external_weights_are_not_read(graphs, tmp_path, monkeypatch):
    """Lowering and checking work on a graph whose weights live in an unloaded external file.

    The threshold puts the norm weights and q biases (256 bytes each) outside too: small
    tensors like these are what initializer deduplication would try to read.
    """
    path = tmp_path / "step.onnx"
    onnx.save_model(graphs[("step", "inplace")], str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=256)
    proto = onnx.load(str(path), load_external_data=False)
    monkeypatch.chdir(tmp_path.parent)  # the relative weight location resolves nowhere from here
    for target in tidar_graphs.TARGETS:
        low = tidar_graphs.lower(proto, target)
        assert any(t.data_location == TensorProto.EXTERNAL for t in low.graph.initializer)
        assert tidar_graphs.check_graph(low, target) == []


def test_unknown_target(graphs):
    for call in (tidar_graphs.lower, tidar_graphs.check_graph):
        with pytest.raises(TiDARError, match=r"unknown target 'trt-9'") as e:
            call(graphs[("ar_step", "slice")], "trt-9")
        assert "\n" not in str(e.value)


def test_graphs_package_does_not_import_torch():
    code = "import sys, tidar_graphs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------- checker


def _model(nodes, inputs, outputs, opset=18, initializers=()):
    graph = oh.make_graph(nodes, "bad", inputs, outputs, initializer=list(initializers))
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def _vi(name, elem, shape):
    return oh.make_tensor_value_info(name, elem, shape)


def test_checker_unsupported_op():
    bad = _model([oh.make_node("Det", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, [3, 3])],
                 [_vi("y", TensorProto.FLOAT, [])])
    assert tidar_graphs.check_graph(bad, "ort") == []
    for target in ("trt-10.3", "trt-10.15"):
        (msg,) = tidar_graphs.check_graph(bad, target)
        assert "(Det)" in msg and "not supported" in msg


def test_checker_fused_op_on_old_tensorrt():
    bad = _model([oh.make_node("RMSNormalization", ["x", "w"], ["y"])],
                 [_vi("x", TensorProto.FLOAT, [2, 8]), _vi("w", TensorProto.FLOAT, [8])],
                 [_vi("y", TensorProto.FLOAT, [2, 8])], opset=23)
    assert tidar_graphs.check_graph(bad, "trt-10.15") == []
    msgs = tidar_graphs.check_graph(bad, "trt-10.3")
    assert len(msgs) == 2  # opset 23 > 20, and the op itself
    assert any("opset 23" in m for m in msgs) and any("(RMSNormalization)" in m for m in msgs)


def test_checker_dynamic_dim():
    bad = _model([oh.make_node("Relu", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, [1, 8])],
                 [_vi("y", TensorProto.FLOAT, [1, 8])])
    bad.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "seq"
    assert tidar_graphs.check_graph(bad, "ort") == []
    for target in ("trt-10.3", "trt-10.15"):
        (msg,) = tidar_graphs.check_graph(bad, target)
        assert "graph input 'x' dim 1 is dynamic ('seq')" in msg
        assert tidar_graphs.check_graph(bad, target, dynamic_dims=["seq"]) == []


def test_checker_int64_misuse():
    """Clip on int64 is valid ONNX and runs in ORT, but TensorRT lists Clip for floats only."""
    lo, hi = (oh.make_tensor(n, TensorProto.INT64, [], [v]) for n, v in (("lo", 0), ("hi", 9)))
    bad = _model([oh.make_node("Clip", ["x", "lo", "hi"], ["y"])], [_vi("x", TensorProto.INT64, [4])],
                 [_vi("y", TensorProto.INT64, [4])], initializers=[lo, hi])
    assert tidar_graphs.check_graph(bad, "ort") == []
    for target in ("trt-10.3", "trt-10.15"):
        (msg,) = tidar_graphs.check_graph(bad, target)
        assert "(Clip): INT64 data" in msg and "FP32, FP16, BF16 only" in msg
    fixed = ir.serde.deserialize_model(bad)
    assert fixups.int_clip_to_min_max(fixed) == 1
    assert tidar_graphs.check_graph(ir.serde.serialize_model(fixed), "trt-10.15") == []


def test_checker_tensor_scatter_axis_and_attention_cache_inputs():
    cache, new = _vi("cache", TensorProto.FLOAT, [1, 2, 8, 4]), _vi("new", TensorProto.FLOAT, [1, 2, 3, 4])
    idx = _vi("idx", TensorProto.INT64, [1])
    scatter = _model([oh.make_node("TensorScatter", ["cache", "new", "idx"], ["out"], axis=2)],
                     [cache, new, idx], [_vi("out", TensorProto.FLOAT, [1, 2, 8, 4])], opset=24)
    (msg,) = tidar_graphs.check_graph(scatter, "trt-10.15")
    assert "attribute axis=2" in msg and "[-2]" in msg

    q, out = _vi("q", TensorProto.FLOAT, [1, 2, 3, 4]), _vi("y", TensorProto.FLOAT, [1, 2, 3, 4])
    past = [_vi(n, TensorProto.FLOAT, [1, 2, 5, 4]) for n in ("pk", "pv")]
    attn = _model([oh.make_node("Attention", ["q", "new", "new", "", "pk", "pv"], ["y"])],
                  [q, new, *past], [out], opset=24)
    assert len(tidar_graphs.check_graph(attn, "trt-10.15")) == 2  # past_key, past_value
    assert tidar_graphs.check_graph(attn, "ort") == []


def test_checker_foreign_domain():
    bad = _model([oh.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")],
                 [_vi("x", TensorProto.FLOAT, [4])], [_vi("y", TensorProto.FLOAT, [4])])
    bad.opset_import.append(oh.make_opsetid("com.microsoft", 1))
    assert tidar_graphs.check_graph(bad, "ort") == []
    msgs = tidar_graphs.check_graph(bad, "trt-10.15")
    assert len(msgs) == 2 and all("com.microsoft" in m for m in msgs)  # the import and the node


@pytest.mark.parametrize("target", tidar_graphs.TARGETS)
def test_operator_tables(target):
    """Tables name real ONNX operators and TensorRT type names, and say where they come from."""
    table = checker.load_table(tidar_graphs.targets.get_target(target).table)
    assert table["target"] == target and table["source"]
    known = {"FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL", "FP8", "FP4", "INT4"}
    legacy = {"ImageScaler", "ParametricSoftplus", "ScaledTanh"}  # pre-opset-9 ops TensorRT still lists
    for op, entry in (table["ops"] or {}).items():
        assert onnx.defs.has(op) or op in legacy, op
        assert entry["types"] and set(entry["types"]) <= known, op
    for op in table["unsupported"]:
        assert op not in (table["ops"] or {})
    if target == "trt-10.3":
        assert not {"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"} & set(table["ops"])
        assert table["opset"]["max"] == 20
    if target == "trt-10.15":
        assert {"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"} <= set(table["ops"])
        assert "INT64" not in table["ops"]["TensorScatter"]["types"]
