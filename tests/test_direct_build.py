"""The directly built ort graphs (tidar_export.export.direct) against the traced and lowered ones.

Each supported config is exported twice from one tiny checkpoint, with builder="trace" and
builder="direct"; the graphs must have the same bindings and give the same outputs in ONNX
Runtime on the same inputs, and a greedy decode over either artifact gives the same tokens.
- llama: tied embeddings, no biases, the AR step as GroupQueryAttention (head size 16), a draft
  adapter (low-rank updates of q, v, o, gate and down and the embedding offset on the mask rows
  of layer 1; k not adapted: a zero block of the packed q/k/v update)
- qwen2: fp16, untied, q/k/v biases, the AR step with the step's Attention op (ar_step="attention").
  Not with the adapter: ONNX Runtime runs fp16 on the CPU through inserted casts, and the two
  graphs' adapter nodes round in other places (logits 0.13 / 0.18 from fp32 with updates of
  std 0.3), too far apart for the fp16 tolerance here; fp32 is where the two are compared
- qwen3: q/k norm, the AR step as GroupQueryAttention on q, k and v apart
bf16, which ONNX Runtime's CPU provider cannot run, is compared by structure and weights.
What the builder does not cover is traced instead (the TensorRT targets).
"""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.conftest import random_model
from tidar_export.cli import main
from tidar_export.errors import TiDARError
from tidar_export.export.artifact import export_artifact
from tidar_export.model.adapter import AdapterConfig, attach
from tidar_export.model.checkpoint import save_checkpoint
from tidar_runtime import generate_ar_batch, generate_tidar_batch
from tidar_runtime.backends.ort import OrtBackend
from tidar_runtime.manifest import load_manifest

MAX_SEQ_LEN, MAX_BATCH = 48, 2
CONFIGS = {  # name: (model config, draft adapter or None, export options)
    "llama": ({"arch": "llama", "attention_bias": False, "tie_word_embeddings": True, "num_layers": 3},
              AdapterConfig(rank=2, layers=(1,), projections=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")),
              {}),
    "qwen2": ({"arch": "qwen2", "attention_bias": True, "num_layers": 3}, None,
              {"ar_step": "attention", "precision": "fp16"}),
    "qwen3": ({"arch": "qwen3", "qk_norm": True, "attention_bias": False, "num_layers": 3}, None, {}),
}
PROMPTS = [[5, 17, 42, 9, 100, 7], list(range(30, 41))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """config name -> (checkpoint, traced artifact, direct artifact), exported on first use."""
    made = {}

    def get(name):
        if name not in made:
            overrides, adapter, options = CONFIGS[name]
            root = tmp_path_factory.mktemp(f"direct-{name}")
            model = random_model(seed=5, block_size=2, **overrides)
            if adapter is not None:
                with torch.no_grad():
                    for p in attach(model, adapter).parameters():
                        p.normal_(std=0.3)  # a fresh adapter's updates are zero
            ckpt = save_checkpoint(model, root / "ckpt")
            arts = [export_artifact(ckpt, root / builder, max_seq_len=MAX_SEQ_LEN, max_batch=MAX_BATCH,
                                    builder=builder, **options) for builder in ("trace", "direct")]
            made[name] = (ckpt, *arts)
        return made[name]

    return get


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(session, cache_len, rng):
    """Random inputs of a graph: token ids, the given per-row cache lengths, a random cache."""
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else {"prefill_batch": 2, "prompt_len": 7}[d] for d in i.shape]
        if i.name == "cache_len":
            feeds[i.name] = np.array(cache_len, np.int64)
        elif i.type == "tensor(int64)":
            feeds[i.name] = rng.integers(0, 256, shape, dtype=np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float16 if "float16" in i.type else np.float32)
    return feeds


@pytest.mark.parametrize("name", CONFIGS)
def test_direct_graphs_equal_traced(exported, name):
    """Same bindings (the manifest's) and the same outputs: token ids equal, logits and K/V
    within rounding (1e-5 of the largest value in fp32, 1e-3 in fp16), for the prefill and the
    cached graphs at two sets of cache lengths."""
    _, traced, direct = exported(name)
    manifest = load_manifest(direct)
    tol = {"fp32": 1e-5, "fp16": 1e-3}[manifest.export["precision"]]
    assert json.loads((traced / "manifest.json").read_text())["graphs"].keys() == manifest.graphs.keys()
    rng = np.random.default_rng(0)
    for kind, spec in manifest.graphs.items():
        a, b = _session(traced / spec.file), _session(direct / spec.file)
        for ends in ("get_inputs", "get_outputs"):
            want = [(t.name, t.type, t.shape) for t in getattr(a, ends)()]
            assert [(t.name, t.type, t.shape) for t in getattr(b, ends)()] == want, (kind, ends)
        names = [t.name for t in b.get_inputs()] + [t.name for t in b.get_outputs()]
        assert names == [t.name for t in spec.inputs] + [t.name for t in spec.outputs], kind
        for cache_len in ([0, 0], [3, 17]) if kind != "prefill" else ([],):
            feeds = _feeds(a, cache_len, rng)
            got = b.run(None, {k: v.copy() for k, v in feeds.items()})
            for out, want, have in zip(a.get_outputs(), a.run(None, feeds), got):
                if want.dtype == np.int64:
                    np.testing.assert_array_equal(have, want, err_msg=f"{kind} {out.name}")
                else:
                    np.testing.assert_allclose(have, want, rtol=tol, atol=tol * float(np.abs(want).max()),
                                               err_msg=f"{kind} {out.name} cache_len={cache_len}")


@pytest.mark.parametrize("name", CONFIGS)
def test_direct_decode_equals_traced(exported, name):
    """A greedy batched decode over the direct artifact gives the traced artifact's tokens, TiDAR and AR."""
    _, traced, direct = exported(name)
    for generate in (generate_tidar_batch, generate_ar_batch):
        want = generate(OrtBackend(traced), PROMPTS, 20)
        got = generate(OrtBackend(direct), PROMPTS, 20)
        assert [g.tokens for g in got] == [w.tokens for w in want], generate.__name__
        assert all(len(g.tokens) == 20 for g in got)


def test_direct_artifact_passes_check(exported, capsys):
    """`tidar-export check ART --checkpoint CKPT`: target checks and ORT against torch."""
    ckpt, _, direct = exported("llama")
    assert main(["check", str(direct), "--checkpoint", str(ckpt)]) == 0
    manifest = load_manifest(direct)
    assert manifest.versions["exporter"] == "tidar_export.export.direct"


def test_bf16_graphs_have_the_traced_structure_and_weights(tmp_path):
    """bf16 graphs (ONNX Runtime's CPU provider has no bf16 kernels, so no outputs to compare):
    the traced graphs' bindings, compute operators, casts, and weights byte for byte."""
    import onnx

    ckpt = save_checkpoint(random_model(seed=2, arch="llama", attention_bias=False, num_layers=1, block_size=2),
                           tmp_path / "ckpt")
    arts = [export_artifact(ckpt, tmp_path / builder, max_seq_len=MAX_SEQ_LEN, precision="bf16", builder=builder)
            for builder in ("trace", "direct")]
    compute = {"MatMul", "Gather", "RMSNormalization", "RotaryEmbedding", "Attention", "GroupQueryAttention",
               "Sigmoid", "Mul", "Add", "Split", "ArgMax", "Cos", "Sin"}
    for kind in ("prefill", "step", "ar_step"):
        traced, direct = (onnx.load(str(a / f"{kind}.onnx")) for a in arts)  # with the weights
        for ends in ("input", "output"):
            want = [(v.name, v.type.SerializeToString()) for v in getattr(traced.graph, ends)]
            assert [(v.name, v.type.SerializeToString()) for v in getattr(direct.graph, ends)] == want, (kind, ends)
        ops = [sorted((n.op_type, [a.i for a in n.attribute if a.name == "to"]) for n in m.graph.node
                      if n.op_type in compute or n.op_type == "Cast") for m in (traced, direct)]
        assert ops[0] == ops[1], kind
        # every bf16 tensor: weights and tables (the traced graphs share equal ones: compared as sets)
        weights = [{(t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in m.graph.initializer
                    if t.data_type == onnx.TensorProto.BFLOAT16} for m in (traced, direct)]
        assert weights[0] == weights[1], kind


def test_uncovered_export_is_traced(tmp_path, capsys):
    """A TensorRT target is not built directly: "auto" traces it and says why; "direct" refuses."""
    ckpt = save_checkpoint(random_model(seed=1, num_layers=1, block_size=2), tmp_path / "ckpt")
    why = "target trt-10.3 (the direct builder makes ort graphs)"
    with pytest.raises(TiDARError, match=re.escape(f"direct does not cover this export: {why}")):
        export_artifact(ckpt, tmp_path / "refused", max_seq_len=MAX_SEQ_LEN, target="trt-10.3", builder="direct")
    assert not (tmp_path / "refused").exists()
    lines = []
    art = export_artifact(ckpt, tmp_path / "art", max_seq_len=MAX_SEQ_LEN, target="trt-10.3", log=lines.append)
    assert lines[0] == f"tracing the graphs: the direct builder does not cover {why}"
    assert load_manifest(art).versions["exporter"] == "torch.onnx.export(dynamo=True)"
    assert all("traced and lowered" in line for line in lines[1:4]), lines


def test_builder_flag(exported, tmp_path, capsys):
    """`tidar-export export --builder direct` prints one line per graph; an unknown builder is refused."""
    ckpt, _, _ = exported("llama")
    assert main(["export", str(ckpt), "-o", str(tmp_path / "art"), "--max-seq-len", str(MAX_SEQ_LEN),
                 "--builder", "direct"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:3]] == ["prefill", "step", "ar_step"]
    assert all("built directly for ort" in line for line in out[:3]), out
    with pytest.raises(TiDARError, match="unknown builder"):
        export_artifact(ckpt, tmp_path / "x", builder="fast")
