"""Quantization (docs/QUANTIZATION.md): Q/DQ artifacts from `tidar-export quantize`.

A tiny random model is exported (target trt-10.15, which ONNX Runtime also runs) and
quantized to int8 and fp8 with token-id calibration prompts. Checked: the graphs pass the
target checker, carry symmetric Q/DQ (zero points 0, per-channel weights) on the linear layers only, share one weight file,
run in ONNX Runtime, decode in agreement with the fp32 artifact above a measured threshold,
and feed the builder; failures leave nothing behind.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

import tidar_graphs
from tests.conftest import random_model
from tidar_export.engines import quantize as quant
from tidar_export.engines.build import build_settings
from tidar_export.model.checkpoint import save_checkpoint
from tidar_export.cli import main
from tidar_export.errors import TiDARError
from tidar_export.export.artifact import export_artifact
from tidar_runtime import SamplingParams, generate_tidar
from tidar_runtime.backends.ort import OrtBackend
from tidar_runtime.manifest import load_manifest

__import__("onnxruntime").set_default_logger_severity(3)  # TensorScatter's in-place warning (trt-10.15)
MAX_SEQ_LEN, NEW = 64, 16
TARGET = "trt-10.15"  # one export for every test (fast): ONNX Runtime runs these graphs as well
# Greedy token agreement with the fp32 artifact, per position: the AR graphs are fed the fp32
# artifact's greedy TiDAR output, and the argmax at every position is compared (8 random prompts
# x 16 tokens; quant.token_agreement). Measured on this tiny random model (vocab 256, held-out
# loss 4.29 nats: flat distributions, many near ties): int8 0.875, fp8 0.63 (E4M3 keeps 3
# mantissa bits, a 6% step; int8's step is under 1% of the calibrated range). The thresholds
# sit below the measurements, with room for seed-to-seed variation, and above what a broken
# recipe gives: activation scales 100x too small (test below) measured well under them.
# (Agreement up to the first difference is much lower -- 0.30 / 0.06 here -- because one
# flipped near tie changes the rest of the text; docs/QUANTIZATION.md reports both.)
AGREEMENT = {"int8": 0.75, "fp8": 0.5}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(random_model(seed=5), tmp_path_factory.mktemp("ckpt") / "tiny")


def _prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=int(rng.integers(4, 20))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def artifacts(checkpoint, tmp_path_factory):
    """(target, precision) -> artifact directory, made on first use."""
    root = tmp_path_factory.mktemp("artifacts")
    made = {}

    def get(target: str, precision: str = "fp32"):
        if (target, precision) not in made:
            if precision == "fp32":
                made[target, precision] = export_artifact(checkpoint, root / f"{target}-fp32", target=target,
                                                          max_seq_len=MAX_SEQ_LEN)
            else:
                src = get(target)
                vocab = load_manifest(src).model["vocab_size"]
                made[target, precision] = quant.quantize_artifact(
                    src, root / f"{target}-{precision}", precision, prompts=_prompts(vocab, 6, 1),
                    samples=16, max_new_tokens=NEW)
        return made[target, precision]

    return get


def _greedy(artifact, prompts) -> list[list[int]]:
    backend = OrtBackend(artifact)
    return [generate_tidar(backend, p, NEW, SamplingParams()).tokens for p in prompts]


def _agreement(reference, artifact, prompts) -> float:
    """Per-position greedy agreement of `artifact` with `reference` along the reference's output."""
    windows = [p + t for p, t in zip(prompts, _greedy(reference, prompts))]
    _, ref = quant.teacher_forced(OrtBackend(reference), windows)
    _, got = quant.teacher_forced(OrtBackend(artifact), windows)
    return quant.token_agreement(ref, got)


# --------------------------------------------------------------------------- the graphs


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_graphs_pass_the_target_checker(artifacts, precision):
    art = artifacts(TARGET, precision)
    m = load_manifest(art)
    assert m.precision == precision and m.target == TARGET
    for kind, spec in m.graphs.items():
        assert spec.file == f"{kind}.{precision}.onnx"
        proto = onnx.load(str(art / spec.file), load_external_data=False)
        dynamic = [d for d, v in m.dims.items() if v is None] if kind == "prefill" else []
        assert tidar_graphs.check_graph(proto, "trt-10.15", dynamic_dims=dynamic) == [], kind


def test_checker_tells_qdq_types_apart(artifacts):
    """The table's types apply to DequantizeLinear's quantized input: an fp32 x is reported."""
    proto = onnx.load(str(artifacts(TARGET, "int8") / "step.int8.onnx"), load_external_data=False)
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
    x = dq.input[0]
    scale = dq.input[1]
    dq.input[0] = scale  # a float tensor where the int8 one belongs
    failures = tidar_graphs.check_graph(proto, "trt-10.15")
    assert any("DequantizeLinear" in f and "FP32 data" in f for f in failures), failures
    dq.input[0] = x


@pytest.mark.parametrize("precision, qtype", [("int8", onnx.TensorProto.INT8),
                                              ("fp8", onnx.TensorProto.FLOAT8E4M3FN)])
def test_qdq_is_symmetric_per_channel_on_linear_layers_only(artifacts, precision, qtype):
    art = artifacts(TARGET, precision)
    proto = onnx.load(str(art / f"step.{precision}.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    layers = load_manifest(art).model["num_layers"]
    dq_out = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    quantized = [n for n in matmuls if n.input[1] in dq_out]
    assert len(quantized) == 7 * layers  # q, k, v, o, gate, up, down per layer
    assert all(n.input[0] in dq_out for n in quantized)  # activations too
    assert not any(n.name.startswith("/lm_head/") for n in quantized)
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = onnx.numpy_helper.to_array(inits[n.input[2]])
            assert inits[n.input[2]].data_type == qtype
            assert not np.asarray(zp, dtype=np.float32).any(), n.name  # TensorRT: zero point 0
    for n in quantized:
        w = dq_out[n.input[1]]
        axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
        assert axis == 1 and len(inits[w.input[1]].dims) == 1  # one scale per output channel
    outputs = {o.name for o in proto.graph.output}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in outputs for n in proto.graph.node)


def test_quantized_artifact_shares_one_weight_file(artifacts):
    art = artifacts(TARGET, "int8")
    m = load_manifest(art)
    assert sorted(p.name for p in art.iterdir()) == sorted(
        ["manifest.json", "weights.bin", "quantization.json"] + [g.file for g in m.graphs.values()])
    offsets = {}
    for spec in m.graphs.values():
        proto = onnx.load(str(art / spec.file), load_external_data=False)
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                assert info["location"] == "weights.bin"
                offsets.setdefault(t.name, set()).add(info["offset"])
    q = "model.layers.0.mlp.up_proj.weight.T_quantized"
    assert q in offsets and all(len(v) == 1 for v in offsets.values())  # stored once, shared
    recipe = json.loads((art / "quantization.json").read_text())
    assert recipe["precision"] == "int8" and recipe["graphs"]["step"]["nodes"] == 7 * m.model["num_layers"]
    assert m.versions["quantizer"].startswith("onnxruntime.quantization")


# --------------------------------------------------------------------------- running them


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_decode_agrees_with_fp32(artifacts, precision):
    vocab = load_manifest(artifacts(TARGET)).model["vocab_size"]
    prompts = _prompts(vocab, 8, seed=7)  # held out: not the calibration prompts (seed 1)
    agreement = _agreement(artifacts(TARGET), artifacts(TARGET, precision), prompts)
    assert agreement >= AGREEMENT[precision], agreement
    got = _greedy(artifacts(TARGET, precision), prompts)  # and the TiDAR loop runs on the Q/DQ graphs
    assert all(len(t) == NEW for t in got)


from tidar_runtime.manifest import file_digest  # noqa: E402


def test_broken_calibration_fails_the_agreement_threshold(artifacts, tmp_path):
    """The agreement test can fail: activation scales 100x too small saturate every activation."""
    art = tmp_path / "broken"
    shutil.copytree(artifacts(TARGET, "int8"), art)
    manifest = json.loads((art / "manifest.json").read_text())
    for spec in manifest["graphs"].values():
        proto = onnx.load(str(art / spec["file"]), load_external_data=False)
        scales = {n.input[1] for n in proto.graph.node if n.op_type == "QuantizeLinear"}  # activations only
        for t in proto.graph.initializer:
            if t.name in scales:
                t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) / 100, t.name))
        onnx.save_model(proto, str(art / spec["file"]))
        spec["bytes"] = (art / spec["file"]).stat().st_size
        spec["digest"] = file_digest(art / spec["file"])  # a consistent (wrongly calibrated) artifact
    (art / "manifest.json").write_text(json.dumps(manifest))
    vocab = load_manifest(art).model["vocab_size"]
    prompts = _prompts(vocab, 8, seed=7)
    agreement = _agreement(artifacts(TARGET), art, prompts)
    assert agreement < AGREEMENT["int8"], agreement


def test_ar_loss_through_the_graphs(artifacts):
    vocab = load_manifest(artifacts(TARGET)).model["vocab_size"]
    windows = _prompts(vocab, 3, seed=9)
    fp32 = quant.teacher_forced_ar_loss(OrtBackend(artifacts(TARGET)), windows)
    int8 = quant.teacher_forced_ar_loss(OrtBackend(artifacts(TARGET, "int8")), windows)
    assert np.isfinite(fp32) and fp32 > 0 and abs(int8 - fp32) < 0.1 * fp32


def test_builder_takes_the_quantized_graphs(artifacts):
    art = artifacts(TARGET, "int8")
    s = build_settings(load_manifest(art), art)
    assert s.precision == "int8" and s.strongly_typed and not s.flags
    assert [g.onnx for g in s.graphs] == ["prefill.int8.onnx", "step.int8.onnx", "ar_step.int8.onnx"]


# --------------------------------------------------------------------------- errors and files


def test_fp8_needs_opset_19(artifacts, tmp_path):
    art = tmp_path / "opset18"
    shutil.copytree(artifacts(TARGET), art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["versions"]["opsets"] = {"ai.onnx": 18}
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TiDARError, match="fp8 needs ONNX opset >= 19"):
        quant.quantize_artifact(art, tmp_path / "out", "fp8", prompts=[[3, 4, 5]])
    assert not (tmp_path / "out").exists()


def test_failure_leaves_nothing_behind(artifacts, tmp_path, monkeypatch):
    real = quant.quantize_graph

    def fail_on_step(src, *args, **kwargs):
        if src.name.startswith("step"):
            raise TiDARError("step.onnx: injected failure")
        return real(src, *args, **kwargs)

    monkeypatch.setattr(quant, "quantize_graph", fail_on_step)
    with pytest.raises(TiDARError, match="injected"):
        quant.quantize_artifact(artifacts(TARGET), tmp_path / "q", "int8", prompts=[[3, 4, 5, 6]], samples=2,
                                max_new_tokens=4)
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line(artifacts, tmp_path, capsys):
    for argv, text in ((["quantize", str(artifacts(TARGET, "int8")), "-o", str(tmp_path / "x")], "already quantized"),
                       (["quantize", str(artifacts(TARGET)), "-o", str(tmp_path / "x"), "--calibration",
                         str(tmp_path / "none.txt")], "calibration prompt file not found"),
                       (["quantize", str(artifacts(TARGET)), "-o", str(tmp_path / "x")], "has no tokenizer")):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and text in err, err


def test_shipped_prompts_parse_and_are_not_held_out_text(tmp_path):
    from tidar_export.train import data

    prompts = quant.read_prompt_file(quant.DEFAULT_CALIBRATION)
    assert len(prompts) >= 32 and sum(p.count("\n") for p in prompts) >= 300
    assert all(p.strip() and "# %%" not in p for p in prompts)
    heldout = "\n".join(data.read_texts(data.find_corpus("stdlib").heldout))
    lines = {line.strip() for p in prompts for line in p.splitlines() if len(line.strip()) > 40}
    assert not [line for line in lines if line in heldout]  # no long line of a prompt is held-out text
    f = tmp_path / "p.txt"
    f.write_text("header\n# %%\na = 1\n\n# %%\n\n# %%\nb = 2\n")
    assert quant.read_prompt_file(f) == ["a = 1\n", "b = 2\n"]
    f.write_text("no separator\n")
    with pytest.raises(TiDARError, match="no prompts"):
        quant.read_prompt_file(f)
